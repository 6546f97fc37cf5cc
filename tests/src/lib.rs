//! Test harness: private network namespaces, a "host" with an uplink to a "wan"
//! namespace, real runc containers whose prestart/poststop hooks run the built `netns`
//! binary. Everything is created with unique names and removed in `Drop`, also when a
//! test fails, so tests run in parallel and again. Nothing touches the root namespace's
//! interfaces, and traffic only flows between namespaces made here.
//!
//! The builders return errors ([`Topology::build`], [`NamedNetns::create`]) so that
//! xtask's demo and benchmark share them; the tests use the panicking wrappers
//! ([`Topology::new`], [`NamedNetns::new`]).

pub mod bpf;
pub mod cni;
pub mod ns;
pub mod pkt;
pub mod podman;
pub mod runc;
pub mod topo;
pub mod util;

pub use ns::{NamedNetns, NetnsGuard};
pub use runc::Container;
pub use topo::Topology;
pub use util::{netns_bin, unique};
