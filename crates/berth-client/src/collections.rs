//! Blocks and collections: the Keep block protocol at the controller's
//! root (`PUT /<md5>`, `GET /<locator>`) and the `collections` routes.
//!
//! A block write returns the locator signed for this client's token, and
//! a collection's manifest comes back with its locators signed the same
//! way. Block reads need such a signed locator.

use berth_core::manifest::hex_md5;
use berth_core::Collection;
use bytes::Bytes;
use reqwest::Method;
use serde_json::{json, Value};

use crate::{check_status, Client, ClientError, ListPage, ListParams, Result};

/// Time one block write or read may take: a 64 MiB block at about
/// 1 MB/s.
const BLOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

impl Client {
    /// Writes a block and returns its locator, signed for this client's
    /// token.
    pub async fn put_block(&self, data: Bytes) -> Result<String> {
        let hash = hex_md5(&data);
        let url = self.url(&hash)?;
        let response = self
            .http
            .put(url.clone())
            .bearer_auth(self.token.expose())
            .timeout(BLOCK_TIMEOUT)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(data)
            .send()
            .await
            .map_err(|source| ClientError::Transport {
                method: Method::PUT,
                url: url.to_string(),
                source,
            })?;
        let response = check_status(Method::PUT, url.clone(), response).await?;
        let body = response
            .text()
            .await
            .map_err(|source| ClientError::Transport {
                method: Method::PUT,
                url: url.to_string(),
                source,
            })?;
        Ok(body.trim().to_string())
    }

    /// Reads the block of a signed locator. The caller checks its MD5.
    pub async fn get_block(&self, locator: &str) -> Result<Bytes> {
        let response = self
            .send(Method::GET, locator, &[], None, BLOCK_TIMEOUT)
            .await?;
        let url = response.url().to_string();
        response
            .bytes()
            .await
            .map_err(|source| ClientError::Transport {
                method: Method::GET,
                url,
                source,
            })
    }

    /// Creates a collection from `attributes` (`manifest_text`, `name`, ...).
    pub async fn create_collection(&self, attributes: &Value) -> Result<Collection> {
        let body = json!({ "collection": attributes });
        self.call(Method::POST, "arvados/v1/collections", &[], Some(&body))
            .await
    }

    /// Reads a collection by UUID or portable data hash.
    pub async fn get_collection(&self, uuid_or_pdh: &str) -> Result<Collection> {
        // A `+` in a path segment is literal, but escape it anyway so no
        // proxy reads it as a space.
        let id = uuid_or_pdh.replace('+', "%2B");
        let path = format!("arvados/v1/collections/{id}");
        self.call(Method::GET, &path, &[], None).await
    }

    pub async fn list_collections(&self, params: &ListParams) -> Result<ListPage<Collection>> {
        self.call(
            Method::GET,
            "arvados/v1/collections",
            &params.to_query(),
            None,
        )
        .await
    }

    pub async fn update_collection(&self, uuid: &str, attributes: &Value) -> Result<Collection> {
        let path = format!("arvados/v1/collections/{uuid}");
        let body = json!({ "collection": attributes });
        self.call(Method::PUT, &path, &[], Some(&body)).await
    }

    /// Deletes a collection record; its blocks stay stored.
    pub async fn delete_collection(&self, uuid: &str) -> Result<Collection> {
        let path = format!("arvados/v1/collections/{uuid}");
        self.call(Method::DELETE, &path, &[], None).await
    }
}
