-- The public host key of a container's gateway, as its supervisor
-- publishes it, and the fingerprint the controller computes from it, so
-- that clients check the gateway's key strictly.

ALTER TABLE containers ADD COLUMN gateway_host_key TEXT;
ALTER TABLE containers ADD COLUMN gateway_host_key_fingerprint TEXT;
