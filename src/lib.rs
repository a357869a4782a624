//! Hangar: one on-premise binary that stores firmware, serves it over HTTPS with resumable
//! downloads, and (in later modules) pushes upgrades to gateways over MQTT.
//!
//! # Layout
//! - [`config`]: the one serde config struct, defaults, validation with file/key/reason.
//! - [`cli`]: clap verbs (`serve`, `firmware ...`, `config ...`) and their output.
//! - [`client`]: admin-API client used by the CLI; finds URL, token and CA from the config.
//! - [`app`]: composition root: opens everything, binds listeners, writes `ports.json`, drains.
//! - [`shutdown`]: SIGTERM/SIGINT -> one cancellation token; SIGHUP -> certificate reload.
//! - [`store`]: the only module that names sled; typed records with a schema version.
//! - [`blobs`]: content-addressed image files (temp -> fsync -> rename -> dir fsync).
//! - [`firmware`]: the firmware catalogue: create, list, latest, status, delete.
//! - [`ids`]: validation of versions, device types, ids, file names; version order.
//! - [`auth`]: admin token and signed download URLs.
//! - [`tls`]: generated CA/server certificate, reloadable rustls config.
//! - [`net`]: host name and interface addresses.
//! - [`http`]: the only module that names hyper/axum: router, API, Range downloads, errors.

pub mod app;
pub mod auth;
pub mod blobs;
pub mod broker;
pub mod cli;
pub mod client;
pub mod config;
pub mod devices;
pub mod firmware;
pub mod http;
pub mod ids;
pub mod net;
pub mod ota;
pub mod protocol;
pub mod ratelog;
pub mod shutdown;
pub mod store;
pub mod tls;
