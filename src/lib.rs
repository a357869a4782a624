//! Hangar: one on-premise binary that stores firmware, serves it over HTTPS with resumable
//! downloads, and pushes upgrades to gateways over an embedded MQTT broker.
//!
//! # Layout, by audience
//! - [`server`]: the appliance (`hangar serve`): services, store, the HTTP and MQTT doors.
//! - [`device`]: the device side: the device client, `hangar sim`, `hangar agent`.
//! - [`cli`]: the operator's side: clap verbs and the admin-API client.
//!
//! Shared by all three:
//! - [`protocol`]: wire types and topics of the gateway and Alibaba-style device protocols.
//! - [`bsdiff`]: BSDIFF40 patches (make, apply).
//! - [`bundle`]: the offline bundle format (signed manifest + strict tar).
//! - [`config`]: the one serde config struct, typed, validated with file/key/reason.
//! - [`ids`]: validation of versions, device types, ids, file names; version order.
//! - [`time`]: the one clock (tokio's paused clock moves it in tests).
//! - [`tls`]: the one rustls crypto provider (server and client side).
//! - [`net`]: host name, interface addresses, listeners.
//! - [`ratelog`]: warnings limited to one per second per call site.
//! - [`trust`]: minisign keys and signatures (firmware, bundles, site reports).
//! - [`report`]: the signed site report's audit hash chain.

pub mod bsdiff;
pub mod bundle;
pub mod cli;
pub mod config;
pub mod device;
#[doc(hidden)]
pub mod fuzzing;
pub mod ids;
pub mod net;
pub mod protocol;
pub mod ratelog;
pub mod report;
pub mod server;
pub mod time;
pub mod tls;
pub mod trust;
