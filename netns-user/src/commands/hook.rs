//! `netns [hook]`: the OCI hook, state JSON on stdin.

use super::CommandError;
use crate::cli::GlobalArgs;
use crate::oci::State;

pub fn run(g: &GlobalArgs) -> Result<(), CommandError> {
    let st = State::from_reader(std::io::stdin().lock())?;
    log::debug!(
        "hook: container {} status {} pid {:?}",
        st.id,
        st.status,
        st.pid
    );
    Ok(crate::hook::run(g, &st)?)
}
