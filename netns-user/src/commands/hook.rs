//! `netns [hook]`: the OCI hook, state JSON on stdin.

use super::CommandError;
use crate::caps::Need;
use crate::cli::GlobalArgs;
use crate::oci::{Phase, State};

pub fn run(g: &GlobalArgs) -> Result<(), CommandError> {
    let st = State::from_reader(std::io::stdin().lock())?;
    log::debug!(
        "hook: container {} status {} pid {:?}",
        st.id,
        st.status,
        st.pid
    );
    let (what, need) = match st.phase()? {
        Phase::Prestart => ("the prestart hook", Need::PRESTART),
        Phase::Poststop => ("the poststop hook", Need::DATAPATH),
    };
    crate::caps::require(what, need)?;
    Ok(crate::hook::run(&g.net_config(), &st)?)
}
