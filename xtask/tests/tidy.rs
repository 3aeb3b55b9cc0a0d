//! Tidy checks: the invariants `docs/ARCHITECTURE.md` states, enforced on the tree.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn metadata() -> Value {
    let output = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(root())
        .output()
        .expect("cargo metadata");
    assert!(output.status.success(), "cargo metadata failed");
    serde_json::from_slice(&output.stdout).expect("metadata JSON")
}

fn packages() -> Vec<Value> {
    metadata()["packages"].as_array().unwrap().clone()
}

fn manifest_dir(package: &Value) -> PathBuf {
    Path::new(package["manifest_path"].as_str().unwrap())
        .parent()
        .unwrap()
        .to_path_buf()
}

fn is_protocol(package: &Value) -> bool {
    manifest_dir(package).parent() == Some(&root().join("protocols"))
}

fn normal_dependencies(package: &Value) -> Vec<String> {
    package["dependencies"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["kind"].is_null())
        .map(|d| d["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn protocol_crates_never_depend_on_the_server() {
    for package in packages().iter().filter(|p| is_protocol(p)) {
        let deps = normal_dependencies(package);
        for forbidden in ["switchboard-server", "switchboard-testkit", "axum", "hyper"] {
            assert!(
                !deps.iter().any(|d| d == forbidden),
                "{} depends on {forbidden}; protocol crates depend on switchboard-core only \
                 (the server belongs in dev-dependencies)",
                package["name"]
            );
        }
    }
}

#[test]
fn every_crate_inherits_the_workspace_lints() {
    for package in packages() {
        let manifest = std::fs::read_to_string(package["manifest_path"].as_str().unwrap()).unwrap();
        let inherits = manifest
            .split("[lints]")
            .nth(1)
            .is_some_and(|rest| rest.trim_start().starts_with("workspace = true"));
        assert!(
            inherits,
            "{} lacks `[lints] workspace = true`",
            package["name"]
        );
    }
}

#[test]
fn every_protocol_has_its_doc() {
    let protocols: Vec<Value> = packages().into_iter().filter(is_protocol).collect();
    assert!(protocols.len() >= 6, "expected the protocol crates");
    for package in protocols {
        let dir = manifest_dir(&package);
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let doc = root().join("docs/protocols").join(format!("{name}.md"));
        assert!(doc.exists(), "{} has no {}", package["name"], doc.display());
        let text = std::fs::read_to_string(&doc).unwrap();
        assert!(
            text.to_lowercase().contains("worst-case memory")
                || text.to_lowercase().contains("worst case"),
            "{} states no worst-case memory",
            doc.display()
        );
    }
}

#[test]
fn the_core_does_no_network_io() {
    for path in rust_files(&root().join("crates/switchboard-core/src")) {
        let text = std::fs::read_to_string(&path).unwrap();
        for forbidden in [
            "tokio::net",
            "std::net::Tcp",
            "std::net::Udp",
            "axum",
            "hyper",
        ] {
            assert!(
                !text.contains(forbidden),
                "{} uses {forbidden}: the core does no network IO",
                path.display()
            );
        }
    }
}

/// Every runtime flag of `switchboard serve` is listed with its default and policy in
/// ARCHITECTURE.md's Limits table (or, for flags that are not limits, in the README).
#[test]
fn every_runtime_flag_is_documented() {
    let runtime =
        std::fs::read_to_string(root().join("crates/switchboard-cli/src/runtime.rs")).unwrap();
    let docs = std::fs::read_to_string(root().join("docs/ARCHITECTURE.md")).unwrap()
        + &std::fs::read_to_string(root().join("README.md")).unwrap();
    let args = runtime
        .split("pub(crate) struct RuntimeArgs {")
        .nth(1)
        .and_then(|rest| rest.split("\n}\n").next())
        .expect("RuntimeArgs in runtime.rs");
    let mut checked = 0;
    for line in args.lines() {
        let line = line.trim();
        if let Some(field) = line
            .strip_prefix("pub(crate) ")
            .and_then(|rest| rest.split(':').next())
            .filter(|_| line.ends_with(','))
        {
            let flag = format!("--{}", field.replace('_', "-"));
            let documented = docs.contains(&flag)
                || (flag == "--read-buffer-bytes" && docs.contains("read buffer"))
                || (flag == "--accept-backlog" && docs.contains("backlog"))
                || (flag == "--shutdown-grace" && docs.contains("--shutdown-grace"));
            assert!(
                documented,
                "{flag} is not documented in ARCHITECTURE.md or README.md"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 20,
        "found only {checked} runtime flags; did the parser break?"
    );
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The runtime owns the state engine and hands it to every hook; a protocol that built its own
/// would keep state the cluster and the durable engines never see.
#[test]
fn protocol_crates_never_build_an_engine_of_their_own() {
    let protocols: Vec<Value> = packages().into_iter().filter(is_protocol).collect();
    for package in &protocols {
        for path in rust_files(&manifest_dir(package).join("src")) {
            let text = std::fs::read_to_string(&path).unwrap();
            // Unit tests build engines to drive hooks; only the shipped code is checked.
            let shipped = text.split("#[cfg(test)]").next().unwrap_or_default();
            for forbidden in [
                "Engine::default()",
                "Engine::memory(",
                "Engine::new(",
                "MemoryEngine",
                "MemoryCluster",
            ] {
                assert!(
                    !shipped.contains(forbidden),
                    "{} uses {forbidden}: protocols use the engine the runtime passes to hooks",
                    path.display()
                );
            }
        }
    }
}

/// Every state engine implementation runs the shared engine-conformance suite.
#[test]
fn every_state_engine_runs_the_conformance_suite() {
    let mut implementations = 0;
    let mut suites = 0;
    for top in ["crates", "protocols"] {
        for path in rust_files(&root().join(top)) {
            let text = std::fs::read_to_string(&path).unwrap();
            let in_tests = path.components().any(|c| c.as_os_str() == "tests");
            if !in_tests {
                implementations += text.matches("impl StateEngine for").count();
            }
            if in_tests {
                suites += text.matches("engine_conformance!(").count();
            }
        }
    }
    assert!(
        implementations >= 1,
        "the memory engine implements StateEngine"
    );
    assert_eq!(
        implementations, suites,
        "each StateEngine implementation needs a test running switchboard_testkit::engine_conformance!"
    );
}
