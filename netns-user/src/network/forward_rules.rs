//! The host firewall's FORWARD rules that name the bridge or the subnet: the fast path
//! bypasses them, and says so. Read only, with the host's own tools when it has them
//! (netns never changes the firewall).

use std::process::{Command, Stdio};

/// Where Debian puts them; a hook may run with no PATH at all.
const IPTABLES_SAVE: &str = "/usr/sbin/iptables-save";
const NFT: &str = "/usr/sbin/nft";

/// FORWARD rules (iptables' filter table and nftables chains on the forward hook) that
/// mention any of `needles` (the bridge's name, the subnet). Tools that are missing
/// or fail count as no rules.
pub fn mentioning(needles: &[String]) -> Vec<String> {
    let mut rules = iptables_forward(&run(IPTABLES_SAVE, &["-t", "filter"]), needles);
    rules.extend(nft_forward(&run(NFT, &["list", "ruleset"]), needles));
    rules
}

fn run(bin: &str, args: &[&str]) -> String {
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn iptables_forward(save: &str, needles: &[String]) -> Vec<String> {
    save.lines()
        .filter(|l| l.starts_with("-A FORWARD "))
        .filter(|l| needles.iter().any(|n| l.contains(n.as_str())))
        .map(str::to_owned)
        .collect()
}

fn nft_forward(ruleset: &str, needles: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_forward = false;
    for l in ruleset.lines().map(str::trim) {
        if l.starts_with("chain ") {
            in_forward = false;
        } else if l.starts_with("type filter hook forward") {
            in_forward = true;
        } else if in_forward && needles.iter().any(|n| l.contains(n.as_str())) {
            out.push(l.to_owned());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn needles() -> Vec<String> {
        vec!["netns0".into(), "172.19.0.0/16".into()]
    }

    #[test]
    fn finds_iptables_forward_rules_naming_the_bridge_or_subnet() {
        let save = "*filter\n:FORWARD DROP [0:0]\n-A FORWARD -i netns0 -j ACCEPT\n\
                    -A INPUT -i netns0 -j ACCEPT\n-A FORWARD -s 10.0.0.0/8 -j DROP\n\
                    -A FORWARD -d 172.19.0.0/16 -j DROP\nCOMMIT\n";
        assert_eq!(
            iptables_forward(save, &needles()),
            [
                "-A FORWARD -i netns0 -j ACCEPT",
                "-A FORWARD -d 172.19.0.0/16 -j DROP"
            ]
        );
    }

    #[test]
    fn finds_nft_rules_in_forward_hook_chains_only() {
        let rs = "table inet filter {\n\tchain input {\n\t\ttype filter hook input priority 0;\n\
                  \t\tiifname \"netns0\" accept\n\t}\n\tchain fwd {\n\
                  \t\ttype filter hook forward priority 0; policy drop;\n\
                  \t\tiifname \"netns0\" accept\n\t\tip saddr 10.0.0.0/8 drop\n\t}\n}\n";
        assert_eq!(nft_forward(rs, &needles()), ["iifname \"netns0\" accept"]);
        assert!(nft_forward("", &needles()).is_empty());
    }
}
