//! `wsdrain lab soak`: many rolling restarts in a row with clients connected, to show
//! that nothing accumulates. Each round replaces every pod one at a time (surge one,
//! then terminate the oldest in kubelet order), and once every client is back the
//! memory and open file descriptors of the pods' agents and apps are sampled.
//!
//! Fields beyond `seed`'s: `rounds`; `agent_rss_growth_ratio`, the agents' mean RSS
//! after the last round over that after the first; `fd_leak`, the open fds of all
//! agents and apps after the last round minus before the first (0 when nothing leaks;
//! the pods are new processes by then, so this shows per-process state that grows with
//! the deployment's history, such as the app's view of its sessions).

use std::process::ExitCode;

use serde::Serialize;

use super::LabArgs;
use super::report::Summary;
use super::runner;
use super::scenario::{Scenario, Step};

/// Pods in the soak's deployment.
const PODS: usize = 3;
/// Clients when `--clients` is not given.
const DEFAULT_CLIENTS: usize = 200;

/// Memory and fds of the live pods' processes at one moment.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Sample {
    pub pods: usize,
    /// Mean VmRSS of the agents, KiB.
    pub agent_rss_kib: u64,
    pub agent_fds: usize,
    pub app_fds: usize,
}

impl Sample {
    /// Reads /proc for each (app pid, agent pid). Processes that are gone count as 0.
    pub fn take(pids: &[(i32, Option<i32>)]) -> Sample {
        let agents: Vec<i32> = pids.iter().filter_map(|(_, a)| *a).collect();
        let rss: u64 = agents.iter().map(|&p| rss_kib(p)).sum();
        Sample {
            pods: pids.len(),
            agent_rss_kib: rss / (agents.len().max(1) as u64),
            agent_fds: agents.iter().map(|&p| open_fds(p)).sum(),
            app_fds: pids.iter().map(|(app, _)| open_fds(*app)).sum(),
        }
    }

    fn fds(&self) -> usize {
        self.agent_fds + self.app_fds
    }
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// The soak's scenario: clients, a sample, then per round a rolling restart and a sample.
pub fn scenario(rounds: usize, clients: usize) -> Scenario {
    let mut steps = vec![Step::Clients(clients), Step::Sample];
    for _ in 0..rounds {
        steps.push(Step::Rolling);
        steps.push(Step::Sample);
    }
    Scenario {
        name: "soak".into(),
        pods: PODS,
        steps,
    }
}

/// The soak's report: the seed fields and its own.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub rounds: usize,
    pub agent_rss_growth_ratio: Option<f64>,
    pub fd_leak: i64,
    #[serde(flatten)]
    pub summary: Summary,
}

/// Folds the samples (before, after round 1, …, after round N) into the soak's fields.
pub fn report(rounds: usize, summary: Summary) -> SoakReport {
    let s = &summary.samples;
    let ratio = match (s.get(1), s.last()) {
        (Some(first), Some(last)) if first.agent_rss_kib > 0 => {
            Some(last.agent_rss_kib as f64 / first.agent_rss_kib as f64)
        }
        _ => None,
    };
    let fd_leak = match (s.first(), s.last()) {
        (Some(before), Some(after)) => after.fds() as i64 - before.fds() as i64,
        _ => 0,
    };
    SoakReport {
        rounds,
        agent_rss_growth_ratio: ratio,
        fd_leak,
        summary,
    }
}

pub async fn run(args: &LabArgs) -> anyhow::Result<ExitCode> {
    // Every round starts PODS new pods, each in an ingress slot of its own.
    let max_rounds = super::ingress::SLOTS / PODS - 1;
    if args.rounds == 0 || args.rounds > max_rounds {
        anyhow::bail!("--rounds {}: use 1 to {max_rounds}", args.rounds);
    }
    let clients = args.clients.unwrap_or(DEFAULT_CLIENTS);
    let scenario = scenario(args.rounds, clients);
    let cfg = args.config(scenario, args.agent, args.ingress, None);
    if !args.quiet {
        eprintln!(
            "wsdrain lab soak: {} rounds of rolling restarts, {clients} clients, {PODS} pods, run id {}",
            args.rounds, cfg.run_id
        );
    }
    let summary = runner::run(&cfg).await?;
    let r = report(args.rounds, summary);
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{}\nrounds {}, agent RSS growth ratio {}, fd leak {}",
            super::report::table(&[("soak".to_owned(), r.summary.clone())]),
            r.rounds,
            r.agent_rss_growth_ratio
                .map_or("n/a".to_owned(), |x| format!("{x:.3}")),
            r.fd_leak
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rss: u64, agent_fds: usize, app_fds: usize) -> Sample {
        Sample {
            pods: 3,
            agent_rss_kib: rss,
            agent_fds,
            app_fds,
        }
    }

    #[test]
    fn growth_is_last_round_over_first_and_leak_is_after_minus_before() {
        let summary = Summary {
            samples: vec![
                sample(5000, 30, 230),
                sample(4000, 30, 232),
                sample(4100, 31, 230),
                sample(4400, 33, 231),
            ],
            ..Default::default()
        };
        let r = report(3, summary);
        assert_eq!(r.rounds, 3);
        assert!((r.agent_rss_growth_ratio.unwrap() - 1.1).abs() < 1e-9);
        assert_eq!(r.fd_leak, 4);
    }

    #[test]
    fn the_scenario_samples_before_and_after_every_round() {
        let s = scenario(2, 10);
        assert_eq!(
            s.steps,
            vec![
                Step::Clients(10),
                Step::Sample,
                Step::Rolling,
                Step::Sample,
                Step::Rolling,
                Step::Sample
            ]
        );
        assert_eq!(s.pods, PODS);
    }
}
