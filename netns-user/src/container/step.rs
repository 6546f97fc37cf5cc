//! The prestart steps, their errors, and the fault-injection plan.

use std::fmt;

use crate::datapath::DatapathError;
use crate::host::HostError;
use crate::ipam::IpamError;
use crate::network::{self, NetworkError, sysctl};
use crate::portmap;

/// Prestart steps, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Create/configure the bridge (shared, never undone).
    Bridge,
    /// Enable IPv4 forwarding in the hook's namespace (shared, never undone).
    IpForward,
    /// Allocate (or find) the container's lease. Undo: release it.
    Ipam,
    /// Create the veth pair and enslave the host end. Undo: delete the veth.
    Veth,
    /// lo/eth0 up, address and default route inside the container.
    ContainerNet,
    /// Load the datapath or open its pins (shared, never undone).
    DatapathLoad,
    /// Attach the port program to the host veth. Undo: detach.
    AttachPort,
    /// Register the container in the endpoint map. Undo: remove it.
    AddEndpoint,
    /// Port forwards declared in the `netns.ports` annotation. Undo: remove them.
    PortMap,
    /// Mark the lease complete with ifindex and MAC.
    Persist,
}

impl Step {
    pub const ALL: [Step; 10] = [
        Step::Bridge,
        Step::IpForward,
        Step::Ipam,
        Step::Veth,
        Step::ContainerNet,
        Step::DatapathLoad,
        Step::AttachPort,
        Step::AddEndpoint,
        Step::PortMap,
        Step::Persist,
    ];

    /// The name the fault-injection variables take.
    pub fn name(self) -> &'static str {
        match self {
            Step::Bridge => "bridge",
            Step::IpForward => "ip-forward",
            Step::Ipam => "ipam",
            Step::Veth => "veth",
            Step::ContainerNet => "container-net",
            Step::DatapathLoad => "datapath-load",
            Step::AttachPort => "attach-port",
            Step::AddEndpoint => "add-endpoint",
            Step::PortMap => "port-map",
            Step::Persist => "persist",
        }
    }

    pub fn from_name(s: &str) -> Option<Step> {
        Step::ALL.into_iter().find(|st| st.name() == s)
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a step (or an undo action) failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Netlink(#[from] network::NetlinkError),
    #[error(transparent)]
    Sysctl(#[from] sysctl::SysctlError),
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    PortMap(#[from] portmap::PortMapError),
    #[error("failure injected after step {0}")]
    Injected(Step),
}

/// A failed setup: the step, what the rollback left behind, and why.
#[derive(Debug, thiserror::Error)]
#[error("prestart failed at step {step}{}", rollback_note(*.rollback_failures))]
pub struct SetupError {
    pub step: Step,
    pub rollback_failures: usize,
    #[source]
    pub source: StepError,
}

fn rollback_note(n: usize) -> String {
    if n == 0 {
        " (rolled back)".to_owned()
    } else {
        format!(" (rollback left {n} item(s) behind; see the log above)")
    }
}

/// Testing aid: fail (with rollback) or die (SIGKILL, no rollback) right after a step.
/// Only the `fault-injection` build reads them from the environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    pub fail_at: Option<Step>,
    pub kill_at: Option<Step>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_names_roundtrip() {
        for s in Step::ALL {
            assert_eq!(Step::from_name(s.name()), Some(s));
        }
        assert_eq!(Step::from_name("nope"), None);
    }
}
