//! The controller calls the dispatch loop makes, behind a trait so that
//! the loop's decisions can be tested against an in-memory controller.
//!
//! [`berth_client::Client`] implements it for the real controller.
//! [`ControllerApi::container_changes`] is the change feed, through which
//! the loop hears of changed containers between two listings of the queue.
//! [`list_all`] pages through a container list by UUID (keyset paging), so
//! that records created or changed during the walk neither shift nor
//! repeat the pages.

use std::time::Duration;

use async_trait::async_trait;
use berth_client::{Client, ClientError, ContainerChanges, ListPage, ListParams, Locked};
use berth_core::Container;
use serde_json::{json, Value};

/// Page size of container lists; the controller's maximum.
pub const PAGE_SIZE: u64 = 1000;

/// The controller, as the dispatcher uses it.
#[async_trait]
pub trait ControllerApi: Send + Sync {
    /// Returns the UUID of the token this client uses, which the controller
    /// records as `locked_by_uuid` on the containers it locks.
    async fn token_uuid(&self) -> Result<String, ClientError>;
    async fn list_containers(
        &self,
        params: &ListParams,
    ) -> Result<ListPage<Container>, ClientError>;
    async fn get_container(&self, uuid: &str) -> Result<Container, ClientError>;
    async fn lock_container(&self, uuid: &str) -> Result<Locked, ClientError>;
    async fn unlock_container(&self, uuid: &str) -> Result<Container, ClientError>;
    async fn update_container(
        &self,
        uuid: &str,
        attributes: &Value,
    ) -> Result<Container, ClientError>;
    /// Reads the containers changed after the cursor `after`, waiting up to
    /// `wait` for one; without `after`, returns the current cursor and no
    /// items ([`Client::container_changes`]). A cursor the controller cannot
    /// use is a 422.
    async fn container_changes(
        &self,
        after: Option<&str>,
        wait: Duration,
    ) -> Result<ContainerChanges, ClientError>;
}

#[async_trait]
impl ControllerApi for Client {
    async fn token_uuid(&self) -> Result<String, ClientError> {
        let authorization = self.current_api_client_authorization().await?;
        authorization
            .get("uuid")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| {
                ClientError::Settings(
                    "the controller's response to GET api_client_authorizations/current has no uuid"
                        .to_string(),
                )
            })
    }

    async fn list_containers(
        &self,
        params: &ListParams,
    ) -> Result<ListPage<Container>, ClientError> {
        Client::list_containers(self, params).await
    }

    async fn get_container(&self, uuid: &str) -> Result<Container, ClientError> {
        Client::get_container(self, uuid).await
    }

    async fn lock_container(&self, uuid: &str) -> Result<Locked, ClientError> {
        Client::lock_container(self, uuid).await
    }

    async fn unlock_container(&self, uuid: &str) -> Result<Container, ClientError> {
        Client::unlock_container(self, uuid).await
    }

    async fn update_container(
        &self,
        uuid: &str,
        attributes: &Value,
    ) -> Result<Container, ClientError> {
        Client::update_container(self, uuid, attributes).await
    }

    async fn container_changes(
        &self,
        after: Option<&str>,
        wait: Duration,
    ) -> Result<ContainerChanges, ClientError> {
        Client::container_changes(self, after, wait).await
    }
}

/// Lists every container that matches `filters`, in UUID order, one page
/// of up to [`PAGE_SIZE`] at a time.
pub async fn list_all(
    api: &dyn ControllerApi,
    filters: &[Value],
) -> Result<Vec<Container>, ClientError> {
    let mut containers: Vec<Container> = Vec::new();
    loop {
        let mut page_filters = filters.to_vec();
        if let Some(last) = containers.last() {
            page_filters.push(json!(["uuid", ">", last.uuid]));
        }
        let params = ListParams {
            filters: Some(Value::Array(page_filters)),
            order: Some(vec!["uuid asc".to_string()]),
            limit: Some(PAGE_SIZE),
            count: Some("none".to_string()),
            ..ListParams::default()
        };
        let page = api.list_containers(&params).await?;
        // The controller may cap the limit below the one asked for; a page
        // shorter than the cap is the last.
        let limit = if page.limit > 0 {
            page.limit.min(PAGE_SIZE)
        } else {
            PAGE_SIZE
        };
        let count = page.items.len() as u64;
        let before = containers.last().map(|c| c.uuid.clone());
        containers.extend(page.items);
        let advanced = containers.last().map(|c| &c.uuid) != before.as_ref();
        if count < limit || !advanced {
            return Ok(containers);
        }
    }
}
