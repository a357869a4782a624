//! Hangar: one on-premise binary that stores firmware, serves it over HTTPS with resumable
//! downloads, and pushes upgrades to gateways over an embedded MQTT broker.
//!
//! # Layout
//! - [`config`]: the one serde config struct, defaults, validation with file/key/reason.
//! - [`cli`]: clap verbs (`serve`, `firmware ...`, `config ...`) and their output.
//! - [`client`]: admin-API client used by the CLI; finds URL, token and CA from the config.
//! - [`app`]: composition root: opens everything, binds listeners, writes `ports.json`, drains.
//! - [`shutdown`]: SIGTERM/SIGINT -> one cancellation token; SIGHUP -> certificate reload.
//! - [`datadir`]: the data directory's lock (one appliance or restore at a time, with its pid).
//! - [`store`]: the only module that names sled; typed records with a schema version.
//! - [`blobs`]: content-addressed image files (temp -> fsync -> rename -> dir fsync).
//! - [`firmware`]: the firmware catalogue: create, list, latest, status, delete.
//! - [`ids`]: validation of versions, device types, ids, file names; version order.
//! - [`auth`]: admin token and signed download URLs.
//! - [`tls`]: generated CA/server certificate, reloadable rustls config.
//! - [`net`]: host name and interface addresses.
//! - [`http`]: the only module that names hyper/axum: router, API, Range downloads, errors.
//! - [`broker`]: the only module that names rumqttd: embedded broker behind our front door
//!   (TLS, logins, per-device ACL, reports acknowledged after they are persisted).
//! - [`protocol`]: wire types and topics of the gateway and Alibaba-style device protocols.
//! - [`devices`]: the device registry, live presence, and the broker's authenticator.
//! - [`ota`]: upgrade tasks: the pure state machine and the engine that drives it.
//! - [`ratelog`]: warnings limited to one per second per call site.
//! - [`campaigns`]: rollouts in waves with gates, windows, retries; the engine loop.
//! - [`backup`]: backup tar (manifest + checksums, store records, blobs, certs, token), restore.
//! - [`traffic`]: bytes served per image and delta (full vs delta, saved).
//! - [`deltas`]: the delta service: eager/on-demand generation, bounded queue, offers, checks.
//! - [`delta`]: BSDIFF40 patches (make, apply), shared by server, CLI and devices.
//! - [`device`]: the device side: MQTT link, both protocols from the device, resumable download.
//! - [`sim`]: `hangar sim`, a fleet of simulated devices.
//! - [`agent`]: `hangar agent`, the self-updater for one binary on a Linux gateway.

pub mod agent;
pub mod app;
pub mod auth;
pub mod backup;
pub mod blobs;
pub mod broker;
pub mod campaigns;
pub mod cli;
pub mod client;
pub mod config;
pub mod datadir;
pub mod delta;
pub mod deltas;
pub mod device;
pub mod devices;
pub mod error;
pub mod firmware;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod ids;
pub mod net;
pub mod ota;
pub mod protocol;
pub mod ratelog;
pub mod shutdown;
pub mod sim;
pub mod store;
pub mod time;
pub mod tls;
pub mod traffic;
