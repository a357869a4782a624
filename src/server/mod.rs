//! The appliance — what `hangar serve` runs: [`app`], the composition root (opens everything,
//! binds the listeners, writes `ports.json`, drains); its services, each the only owner of its
//! records: [`firmware`] (the catalogue), [`registry`] (devices, presence, the broker's
//! authenticator), [`ota`] (upgrade tasks: pure cores and their driver), [`campaigns`] (rollouts
//! in waves: pure cores and their driver), [`deltas`] (the delta service), [`traffic`] (bytes
//! served); their storage: [`store`] (the only module that names sled), [`blobs`] (image files);
//! their two doors: [`http`] (the only module that names hyper/axum) and [`broker`] (the only
//! module that speaks MQTT); and the process around them: [`auth`] (admin
//! token, signed URLs), [`certs`] (generated or site certificates, reloaded on SIGHUP), [`error`]
//! (the one service error), [`datadir`] (the data directory's lock), [`shutdown`] (signals),
//! [`backup`] (backup tar and restore).

pub mod accounts;
pub mod app;
pub mod archive;
pub mod auth;
pub mod backup;
pub mod blobs;
pub mod broker;
pub mod bundles;
pub mod campaigns;
pub mod certs;
pub mod datadir;
pub mod deltas;
pub mod error;
pub mod events;
pub mod firmware;
pub mod hooks;
pub mod http;
pub mod links;
pub mod memory;
pub mod ota;
pub mod passwords;
pub mod registry;
pub mod shutdown;
pub mod signatures;
pub mod store;
pub mod traffic;
