//! The device side — what runs on (or stands in for) a gateway: [`client`], the MQTT link and
//! both protocols as a device speaks them; [`fetch`], the resumable, verified download and the
//! delta attempt; [`sim`], `hangar sim`, a fleet of simulated devices; [`agent`], `hangar agent`,
//! the self-updater of one binary on a Linux gateway. Deltas are applied with [`crate::bsdiff`],
//! the same code the server makes them with. Nothing here uses the server's modules: a device
//! knows the appliance only through its protocols.

pub mod agent;
pub mod client;
pub mod fetch;
pub mod sim;
