//! Loading the object and pinning it, reloading programs under live maps, unloading;
//! the bpffs mount and the loader lock.

use std::fs::{self, File};
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::Path;

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::SchedClassifierLink;
use aya::programs::{CgroupSockAddr, SchedClassifier};
use aya::{Ebpf, EbpfLoader, include_bytes_aligned};
use netns_common::maps;
use nix::fcntl::{Flock, FlockArg};

use super::attach::{PinnedLink as LinkPin, pinned_links};
use super::pins::{PinLayout, Pins};
use super::status::Attach;
use super::{Datapath, DatapathConfig, DatapathError, io, link_err, old, pin_err, prog_err, sys};

/// The eBPF object built by `build.rs` (aya-build).
static OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netns"));

/// `statfs` magic of a bpffs mount.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

impl Datapath {
    /// Loads and attaches the datapath if it is not pinned yet (under a lock), otherwise
    /// opens the pins; in both cases refreshes the config map from `cfg` and re-attaches
    /// the uplink programs if the uplink changed or its links are gone.
    /// [`Datapath::freshly_loaded`] tells whether this call loaded it.
    pub fn ensure_loaded(cfg: &DatapathConfig) -> Result<Datapath, DatapathError> {
        let pins = Pins::new(&cfg.bpffs_dir);
        ensure_bpffs(&cfg.bpffs_dir)?;
        for d in [
            pins.root(),
            &pins.maps_dir(),
            &pins.progs_dir(),
            &pins.links_dir(),
        ] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .map_err(io(format!("creating {}", d.display())))?;
        }
        let lock = lock_dir(pins.root())?;
        let fresh = !pins.programs_pinned();
        if fresh {
            load_and_pin(&pins, cfg.ct_max).inspect_err(|_| pins.remove_programs())?;
            log::info!("datapath loaded and pinned under {}", pins.root().display());
        }
        let dp = Datapath {
            pins,
            _lock: Some(lock),
            fresh,
        };
        dp.write_config(cfg)?;
        dp.ensure_uplink(cfg)?;
        let (added, removed) = dp.sync_inbound(&cfg.allow_inbound)?;
        for c in added {
            log::info!("inbound allowed from {c}");
        }
        for c in removed {
            log::info!("inbound no longer allowed from {c}");
        }
        let (added, removed) = dp.sync_nomasq(&cfg.no_masquerade)?;
        for c in added {
            log::info!("not masquerading to {c}");
        }
        for c in removed {
            log::info!("masquerading to {c} again");
        }
        // Only once this version is attached: a load that fails leaves the old one be.
        // Still under the lock, so two hooks never remove the same old version.
        old::remove_old_versions(&cfg.bpffs_dir)?;
        Ok(dp)
    }

    /// Replaces every program with the ones of this binary's object, keeping the maps
    /// (conntrack, port forwards, endpoints): each pinned link is switched to the new
    /// program atomically (BPF_LINK_UPDATE), so established flows see no gap.
    /// Returns the link pins switched.
    pub fn reload(&self) -> Result<Vec<String>, DatapathError> {
        let staging = self.pins.root().join("progs_new");
        let _ = fs::remove_dir_all(&staging);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(io(format!("creating {}", staging.display())))?;
        let result = (|| {
            let staged = Pins::staged(&self.pins, &staging);
            load_and_pin(&staged, None)?;
            let marked = self.mark_forward_ports()?;
            if marked > 0 {
                log::info!("marked {marked} port-forward port(s) in use for the new programs");
            }
            let mut replaced = Vec::new();
            for link in pinned_links(&self.pins)? {
                switch_link(&link, &staging.join(link.program))?;
                replaced.push(link.pin.display().to_string());
            }
            for name in Pins::TC_PROGS.iter().chain(Pins::SOCK_PROGS.iter()) {
                let (from, to) = (staging.join(name), self.pins.prog(name));
                fs::rename(&from, &to).map_err(io(format!(
                    "moving {} to {}",
                    from.display(),
                    to.display()
                )))?;
            }
            Ok(replaced)
        })();
        let _ = fs::remove_dir_all(&staging);
        result
    }

    /// Removes every pin (programs, links, maps): the datapath is gone once no process
    /// holds a reference.
    pub fn unload(self) -> Result<(), DatapathError> {
        let root = self.pins.root().to_owned();
        fs::remove_dir_all(&root).map_err(io(format!("removing {}", root.display())))
    }
}

/// Switches a pinned link to the program pinned at `new_prog`, atomically.
fn switch_link(link: &LinkPin, new_prog: &Path) -> Result<(), DatapathError> {
    let what = || {
        format!(
            "switching {} to the new {}",
            link.pin.display(),
            link.program
        )
    };
    if link.attach == Attach::Cgroup {
        // aya 0.14 has no attach_to_link for cgroup programs (nor a conversion of an
        // FdLink into a cgroup link): BPF_LINK_UPDATE by hand.
        return sys::link_update(&link.pin, new_prog).map_err(io(what()));
    }
    let pinned = PinnedLink::from_pin(&link.pin)
        .map_err(link_err(format!("opening {}", link.pin.display())))?;
    let tcx = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(link_err(format!(
        "{} is not a TCX link",
        link.pin.display()
    )))?;
    let mut prog = SchedClassifier::from_pin(new_prog)
        .map_err(prog_err(format!("opening {}", new_prog.display())))?;
    // BPF_LINK_UPDATE; the pin keeps the link, the program's copy of its fd closes on drop.
    prog.attach_to_link(tcx).map_err(prog_err(what()))?;
    Ok(())
}

/// Loads the object with maps pinned by name, and pins each program.
fn load_and_pin(pins: &impl PinLayout, ct_max: Option<u32>) -> Result<(), DatapathError> {
    if OBJECT.is_empty() {
        return Err(DatapathError::NoObject);
    }
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(pins.maps_dir());
    if let Some(n) = ct_max {
        loader.map_max_entries(maps::CONNTRACK, n);
        loader.map_max_entries(maps::CT_KEEP, n);
        loader.map_max_entries(maps::CT_NEW, (n / netns_common::CT_NEW_DIVISOR).max(16));
    }
    let mut ebpf: Ebpf = loader
        .load(OBJECT)
        .map_err(|e| DatapathError::Load(Box::new(e)))?;
    for name in Pins::TC_PROGS {
        let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
        load_pin(prog, name, &pins.prog(name))?;
    }
    for name in Pins::SOCK_PROGS {
        let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
        load_pin(prog, name, &pins.prog(name))?;
    }
    restrict_pins(pins.root())
}

/// A program of the object, as its concrete type.
fn program<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P, DatapathError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| DatapathError::MissingProgram(name.to_owned()))?
        .try_into()
        .map_err(prog_err(format!("{name} has an unexpected program type")))
}

/// What loading and pinning need of a program, whatever its type.
trait Loadable {
    fn load_it(&mut self) -> Result<(), aya::programs::ProgramError>;
    fn pin_it(&mut self, path: &Path) -> Result<(), aya::pin::PinError>;
}

impl Loadable for SchedClassifier {
    fn load_it(&mut self) -> Result<(), aya::programs::ProgramError> {
        self.load()
    }
    fn pin_it(&mut self, path: &Path) -> Result<(), aya::pin::PinError> {
        self.pin(path)
    }
}

impl Loadable for CgroupSockAddr {
    fn load_it(&mut self) -> Result<(), aya::programs::ProgramError> {
        self.load()
    }
    fn pin_it(&mut self, path: &Path) -> Result<(), aya::pin::PinError> {
        self.pin(path)
    }
}

fn load_pin(prog: &mut impl Loadable, name: &str, pin: &Path) -> Result<(), DatapathError> {
    prog.load_it()
        .map_err(prog_err(format!("verifier rejected {name}")))?;
    let _ = fs::remove_file(pin);
    prog.pin_it(pin)
        .map_err(pin_err(format!("pinning {}", pin.display())))
}

/// Pins are root-only: they allow rewriting any container's traffic. A chmod that
/// fails is an error, not a warning.
fn restrict_pins(root: &Path) -> Result<(), DatapathError> {
    let mode = if root.is_dir() { 0o700 } else { 0o600 };
    fs::set_permissions(root, fs::Permissions::from_mode(mode))
        .map_err(io(format!("restricting {} to root", root.display())))?;
    if root.is_dir() {
        let rd = fs::read_dir(root).map_err(io(format!("reading {}", root.display())))?;
        for e in rd {
            let e = e.map_err(io(format!("reading {}", root.display())))?;
            restrict_pins(&e.path())?;
        }
    }
    Ok(())
}

fn lock_dir(dir: &Path) -> Result<Flock<File>, DatapathError> {
    let f = File::open(dir).map_err(io(format!("opening {}", dir.display())))?;
    Flock::lock(f, FlockArg::LockExclusive)
        .map_err(|(_, e)| io(format!("locking {}", dir.display()))(std::io::Error::from(e)))
}

/// Makes sure `dir` lives on a bpffs; mounts one at /sys/fs/bpf if that is where `dir`
/// points and nothing is mounted there yet (systemd normally does this).
fn ensure_bpffs(dir: &Path) -> Result<(), DatapathError> {
    let sysfs_bpf = Path::new("/sys/fs/bpf");
    let probe = if dir.exists() {
        dir
    } else {
        dir.parent().unwrap_or(dir)
    };
    let on_bpffs =
        |p: &Path| nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC);
    if on_bpffs(probe) {
        return Ok(());
    }
    if dir.starts_with(sysfs_bpf) && !on_bpffs(sysfs_bpf) {
        nix::mount::mount(
            Some("bpf"),
            sysfs_bpf,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| io("mounting bpffs on /sys/fs/bpf")(std::io::Error::from(e)))?;
        if on_bpffs(probe) || on_bpffs(sysfs_bpf) {
            return Ok(());
        }
    }
    Err(DatapathError::NotBpffs(dir.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restrict_pins_reports_what_it_could_not_change() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("v2");
        fs::create_dir_all(d.join("maps")).unwrap();
        fs::write(d.join("maps/NETNS_CT"), b"").unwrap();
        fs::set_permissions(d.join("maps/NETNS_CT"), fs::Permissions::from_mode(0o644)).unwrap();
        restrict_pins(&d).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&d.join("maps")), 0o700);
        assert_eq!(mode(&d.join("maps/NETNS_CT")), 0o600);
        let e = restrict_pins(&d.join("missing")).unwrap_err();
        assert!(e.to_string().contains("restricting"), "{e}");
    }
}
