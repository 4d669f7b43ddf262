//! The command line as a user meets it: `wsdrain version`, `wsdrain completion`, and
//! `--help` of every subcommand (an example each, the global `--log-format` once).

mod common;

use std::process::{Command, Output};

use common::wsdrain_bin;

fn run(args: &[&str]) -> Output {
    let out = Command::new(wsdrain_bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "wsdrain {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(args: &[&str]) -> String {
    String::from_utf8(run(args).stdout).expect("utf-8 stdout")
}

#[test]
fn version_names_the_version_commit_profile_and_features() {
    let text = stdout(&["version"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], format!("wsdrain {}", env!("CARGO_PKG_VERSION")));
    let commit = lines[1].strip_prefix("commit: ").expect("commit line");
    assert!(!commit.is_empty(), "{text}");
    // Tests run the debug build, with the features this test was built with.
    assert_eq!(lines[2], "profile: dev", "{text}");
    let features = match (cfg!(feature = "echo"), cfg!(feature = "lab")) {
        (true, true) => "echo, lab",
        (true, false) => "echo",
        (false, _) => "none",
    };
    assert_eq!(lines[3], format!("features: {features}"), "{text}");
    assert_eq!(lines.len(), 4, "{text}");
    // Where `make` set the commit, it is the one printed.
    if let Some(expected) = option_env!("WSDRAIN_GIT_COMMIT").filter(|c| !c.is_empty()) {
        assert_eq!(commit, expected);
    }
}

#[test]
fn completion_scripts_for_bash_zsh_and_fish_cover_every_subcommand() {
    for shell in ["bash", "zsh", "fish"] {
        let script = stdout(&["completion", shell]);
        for sub in [
            "agent",
            "webhook",
            "inject",
            "uninject",
            "wrap",
            "prestop",
            "version",
            "completion",
        ] {
            assert!(script.contains(sub), "{shell} script lacks {sub}");
        }
        assert!(
            script.contains("log-format"),
            "{shell} lacks the global flag"
        );
    }
    // The bash script is valid bash and defines the completion.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wsdrain.bash");
    std::fs::write(&path, stdout(&["completion", "bash"])).unwrap();
    let check = Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p wsdrain", path.display()))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(String::from_utf8_lossy(&check.stdout).contains("wsdrain"));
}

#[test]
fn an_unknown_shell_is_refused_with_the_choices() {
    let out = Command::new(wsdrain_bin())
        .args(["completion", "tcsh"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bash") && err.contains("zsh") && err.contains("fish"),
        "{err}"
    );
}

#[test]
fn every_subcommand_help_has_an_example_and_the_global_flag_once() {
    let top = stdout(&["--help"]);
    assert_eq!(top.matches("--log-format").count(), 1, "{top}");
    let mut subs = vec!["agent", "webhook", "inject", "uninject", "wrap", "prestop"];
    subs.extend(cfg!(feature = "echo").then_some("echo"));
    subs.extend(cfg!(feature = "lab").then_some("lab"));
    subs.extend(["version", "completion"]);
    for sub in subs {
        assert!(top.contains(&format!("\n  {sub} ")), "--help lists {sub}");
        let help = stdout(&[sub, "--help"]);
        assert!(
            help.contains("Example") && help.contains(&format!("  wsdrain {sub}")),
            "`wsdrain {sub} --help` has no example:\n{help}"
        );
        assert_eq!(
            help.matches("--log-format").count(),
            1,
            "`wsdrain {sub} --help`:\n{help}"
        );
        assert!(help.contains("Global options:"), "{help}");
    }
}
