//! Two nodes with their own network stacks: two network namespaces joined by a veth pair,
//! 10.77.0.1 and 10.77.0.2, one `ferrofactory train` launcher in each. The store and Gloo
//! must use the namespaces' addresses (loopback does not cross namespaces), and the job must
//! train exactly like one process. Creating namespaces needs root and iproute2's `ip`; where
//! either is missing the test says why and passes without running.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{assert_success, fixture_config, logged_losses, Job};

const NODE_ADDRS: [&str; 2] = ["10.77.0.1", "10.77.0.2"];

/// Any port: nothing else lives in the namespaces.
const MASTER_PORT: &str = "29500";

/// Two namespaces joined by a veth pair; dropping it deletes them (and so the pair), also when
/// the test fails half-way.
struct LinkedNamespaces {
    names: [String; 2],
    veths: [String; 2],
}

impl LinkedNamespaces {
    /// Creates the namespaces and the link between them, or says why it cannot.
    fn create() -> Result<Self, String> {
        let id = std::process::id();
        // Interface names are at most 15 bytes.
        let linked = Self {
            names: [format!("ff-test-{id}-0"), format!("ff-test-{id}-1")],
            veths: [format!("ffv{id}a"), format!("ffv{id}b")],
        };
        let [ns0, ns1] = &linked.names;
        let [veth0, veth1] = &linked.veths;
        ip(&["netns", "add", ns0])?;
        ip(&["netns", "add", ns1])?;
        ip(&["link", "add", veth0, "type", "veth", "peer", "name", veth1])?;
        for ((ns, veth), addr) in linked.names.iter().zip(&linked.veths).zip(NODE_ADDRS) {
            ip(&["link", "set", veth, "netns", ns])?;
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", veth])?;
            ip(&["-n", ns, "link", "set", veth, "up"])?;
            // A node reaches its own address through the loopback device.
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(linked)
    }
}

impl Drop for LinkedNamespaces {
    fn drop(&mut self) {
        for ns in &self.names {
            let _ = ip(&["netns", "del", ns]);
        }
        // Still here only if creation stopped before moving it into a namespace.
        let _ = ip(&["link", "del", &self.veths[0]]);
    }
}

/// Runs `ip args`; the error says what failed and why.
fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `ip` ({e}); install iproute2"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

#[test]
fn two_nodes_in_two_network_namespaces_train_like_one_process() {
    let namespaces = match LinkedNamespaces::create() {
        Ok(namespaces) => namespaces,
        Err(reason) => {
            eprintln!("skipped: cannot create network namespaces: {reason}");
            return;
        }
    };
    let single = tempfile::tempdir().unwrap();
    let single_job = Job::new(single.path());
    let config = fixture_config(single.path(), "");
    let reference = single_job
        .train("single", &config, &[], &[])
        .wait_until(Instant::now() + Duration::from_secs(120));
    assert_success(&reference);
    let one = logged_losses(&single.path().join("out"));
    assert_eq!(one.len(), 5);

    let dir = tempfile::tempdir().unwrap();
    let job = Job::new(dir.path());
    let config = fixture_config(dir.path(), "");
    let nodes: Vec<_> = namespaces
        .names
        .iter()
        .enumerate()
        .map(|(node, ns)| {
            let node = node.to_string();
            let command = job.wrapped_command(
                &["ip", "netns", "exec", ns],
                &[
                    "train",
                    config.to_str().unwrap(),
                    "per_device_train_batch_size=1",
                ],
                &[
                    ("FORCE_TORCHRUN", "1"),
                    ("NNODES", "2"),
                    ("NODE_RANK", &node),
                    ("MASTER_ADDR", NODE_ADDRS[0]),
                    ("MASTER_PORT", MASTER_PORT),
                ],
            );
            job.spawn(&format!("node{node}"), command)
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    for node in nodes {
        assert_success(&node.wait_until(deadline));
    }
    let two = logged_losses(&dir.path().join("out"));
    assert_eq!(two.len(), one.len());
    for (step, (a, b)) in one.iter().zip(&two).enumerate() {
        assert!((a - b).abs() / a <= 1e-4, "step {}: {a} vs {b}", step + 1);
    }
    job.assert_no_survivors(Duration::from_secs(2));
}
