//! `cargo xtask autobahn`: the Autobahn|Testsuite fuzzing client against
//! `switchboard serve --protocol echo`, cases 1-7, 9 and 10.
//!
//! The suite is Python 2.7 software (`autobahntestsuite==0.8.2` on PyPI). This task finds a
//! Python 2.7 (`$AUTOBAHN_PYTHON`, `python2.7` on the PATH, or one under pyenv), makes a
//! virtualenv under `target/autobahn/venv` once, writes the fuzzing-client spec, runs `wstest`,
//! and reads the per-case results from `target/autobahn/reports/index.json`. It fails unless
//! every case's behaviour is OK, NON-STRICT or INFORMATIONAL and every close behaviour is OK or
//! INFORMATIONAL, and prints the summary that `docs/autobahn.md` records.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};

use serde_json::Value;

/// The cases the hardening work commits to (12 and 13 are permessage-deflate, which the
/// runtime does not negotiate).
const CASES: &[&str] = &[
    "1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*",
];

const PASSING_BEHAVIOUR: &[&str] = &["OK", "NON-STRICT", "INFORMATIONAL"];
const PASSING_CLOSE: &[&str] = &["OK", "INFORMATIONAL"];

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        crate::bench::stop(&mut self.0);
    }
}

/// Runs the suite against the `profile` build of `switchboard`.
pub(crate) fn run(profile: crate::Profile) -> ExitCode {
    match autobahn(profile) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("xtask autobahn: {error}");
            ExitCode::FAILURE
        }
    }
}

fn autobahn(profile: crate::Profile) -> Result<String, String> {
    if !profile.build() {
        return Err(format!("the {} build failed", profile.dir()));
    }
    let root = crate::bench::root();
    let work = root.join("target/autobahn");
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let wstest = install_suite(&work)?;

    let port = crate::bench::free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let binary = profile.bin_dir().join("switchboard");
    let child = Command::new(binary)
        .args(["serve", "--protocol", "echo", "--listen", &addr.to_string()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("could not start the echo server: {e}"))?;
    let _server = Server(child);
    crate::bench::wait_listening(addr)?;

    let reports = work.join("reports");
    let _ = std::fs::remove_dir_all(&reports);
    let spec = serde_json::json!({
        "outdir": reports.to_string_lossy(),
        "servers": [{ "agent": "switchboard", "url": format!("ws://{addr}/ws") }],
        "cases": CASES,
        "exclude-cases": [],
        "exclude-agent-cases": {},
    });
    let spec_path = work.join("fuzzingclient.json");
    std::fs::write(&spec_path, spec.to_string()).map_err(|e| e.to_string())?;
    eprintln!("$ wstest -m fuzzingclient -s {}", spec_path.display());
    let status = Command::new(&wstest)
        .args(["-m", "fuzzingclient", "-s"])
        .arg(&spec_path)
        .current_dir(&work)
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("could not run wstest: {e}"))?;
    if !status.success() {
        return Err(format!("wstest exited with {status}"));
    }
    summarize(&reports.join("index.json"))
}

/// Makes (once) a Python 2.7 virtualenv with the suite and returns its `wstest`.
fn install_suite(work: &Path) -> Result<PathBuf, String> {
    let venv = work.join("venv");
    let wstest = venv.join("bin/wstest");
    if wstest.exists() {
        return Ok(wstest);
    }
    let python = find_python27()?;
    eprintln!(
        "installing autobahntestsuite 0.8.2 with {}",
        python.display()
    );
    let steps: [Vec<String>; 2] = [
        vec![
            "-m".into(),
            "pip".into(),
            "install".into(),
            "--quiet".into(),
            "virtualenv==20.15.1".into(),
        ],
        vec![
            "-m".into(),
            "virtualenv".into(),
            venv.to_string_lossy().into_owned(),
        ],
    ];
    for args in steps {
        run_checked(Command::new(&python).args(&args))?;
    }
    run_checked(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "autobahntestsuite==0.8.2",
    ]))?;
    if wstest.exists() {
        Ok(wstest)
    } else {
        Err("the virtualenv has no wstest after installing autobahntestsuite".into())
    }
}

fn find_python27() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("AUTOBAHN_PYTHON") {
        return Ok(PathBuf::from(path));
    }
    if Command::new("python2.7")
        .arg("--version")
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        return Ok(PathBuf::from("python2.7"));
    }
    let pyenv_root = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".pyenv")))
        .ok_or("no PYENV_ROOT or HOME")?;
    let versions = pyenv_root.join("versions");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&versions)
        .map_err(|e| {
            format!(
                "no Python 2.7: {} ({e}); set AUTOBAHN_PYTHON",
                versions.display()
            )
        })?
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("2.7"))
        .map(|entry| entry.path().join("bin/python2.7"))
        .filter(|path| path.exists())
        .collect();
    found.sort();
    found
        .pop()
        .ok_or_else(|| "no Python 2.7 found (set AUTOBAHN_PYTHON)".to_owned())
}

fn run_checked(command: &mut Command) -> Result<(), String> {
    let status = command
        .status()
        .map_err(|e| format!("could not run {command:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{command:?} exited with {status}"))
    }
}

/// Counts results per case group and behaviour; an error lists every failing case.
fn summarize(index: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(index).map_err(|e| format!("{}: {e}", index.display()))?;
    let index: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let cases = index
        .get("switchboard")
        .and_then(Value::as_object)
        .ok_or("the report has no results for agent `switchboard`")?;
    let mut groups: BTreeMap<u32, BTreeMap<String, usize>> = BTreeMap::new();
    let mut failures = Vec::new();
    for (case, result) in cases {
        let behaviour = result["behavior"].as_str().unwrap_or("MISSING");
        let close = result["behaviorClose"].as_str().unwrap_or("MISSING");
        let group = case
            .split('.')
            .next()
            .and_then(|g| g.parse().ok())
            .unwrap_or(0);
        *groups
            .entry(group)
            .or_default()
            .entry(behaviour.to_owned())
            .or_default() += 1;
        if !PASSING_BEHAVIOUR.contains(&behaviour) || !PASSING_CLOSE.contains(&close) {
            failures.push(format!("{case}: {behaviour} (close: {close})"));
        }
    }
    let mut summary = String::from("| cases | results |\n|---|---|\n");
    for (group, counts) in &groups {
        let counts: Vec<String> = counts.iter().map(|(b, n)| format!("{n} {b}")).collect();
        let _ = writeln!(summary, "| {group}.* | {} |", counts.join(", "));
    }
    let _ = writeln!(
        summary,
        "\n{} cases; {} failing.",
        cases.len(),
        failures.len()
    );
    if failures.is_empty() {
        Ok(summary)
    } else {
        Err(format!(
            "{summary}\nfailing cases:\n{}",
            failures.join("\n")
        ))
    }
}
