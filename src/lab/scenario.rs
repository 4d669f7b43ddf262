//! Scenarios as data: a starting pod count and a list of steps. Built in: `seed`,
//! `rolling`, `deadline`, `pacing`; or a YAML file with the same shape, e.g.
//! `{name: mine, pods: 2, steps: [{clients: 10}, {scale_to: 4}, {scale_to: 1}]}`.

use serde::Deserialize;

use super::LabError;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawStep")]
pub enum Step {
    /// Start this many clients and wait until they are connected.
    Clients(usize),
    /// Clients that arrive one by one, `every_ms` apart, while the next steps run.
    ArrivingClients { n: usize, every_ms: u64 },
    /// Clients that never answer a close frame.
    IgnoringClients(usize),
    /// Add pods (endpoints join once ready) or delete the newest ones (concurrently).
    ScaleTo(usize),
    /// Replace every pod, one at a time: surge one, then delete one old.
    Rolling,
    /// Let traffic flow for this many milliseconds.
    WaitMs(u64),
    /// Tiered ingress only: take one tier listener out of the gateway's pool.
    TierChange,
    /// Once every client is back: record the pods' memory and open fds (the soak).
    Sample,
    /// Let traffic flow this many milliseconds while sampling the sessions per pod
    /// (the `scale-up` figures: imbalance before and after, time to balanced).
    BalanceMs(u64),
    /// The lab autoscaler drives the pod count (the `autoscale` scenario).
    Autoscale(super::fleet::Autoscale),
}

/// A step as written: `rolling` or a one-key map such as `{scale_to: 6}`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawStep {
    Word(String),
    Map(std::collections::BTreeMap<String, u64>),
}

impl TryFrom<RawStep> for Step {
    type Error = String;

    fn try_from(raw: RawStep) -> Result<Step, String> {
        let (key, value) = match raw {
            RawStep::Word(w) if w == "rolling" => return Ok(Step::Rolling),
            RawStep::Word(w) if w == "tier_change" => return Ok(Step::TierChange),
            RawStep::Word(w) if w == "sample" => return Ok(Step::Sample),
            RawStep::Word(w) => return Err(format!("unknown step '{w}'")),
            // The one step with an option: `{arriving_clients: N, every_ms: M}`.
            RawStep::Map(m) if m.contains_key("arriving_clients") => {
                let n = m.get("arriving_clients").copied().unwrap_or(0);
                let every_ms = m.get("every_ms").copied().unwrap_or(100);
                if m.keys().any(|k| k != "arriving_clients" && k != "every_ms") {
                    return Err("arriving_clients takes only every_ms".into());
                }
                let n = usize::try_from(n).map_err(|_| "number too large".to_owned())?;
                return Ok(Step::ArrivingClients { n, every_ms });
            }
            RawStep::Map(m) if m.len() == 1 => m.into_iter().next().ok_or("empty step")?,
            RawStep::Map(_) => return Err("a step has exactly one key".into()),
        };
        let n = usize::try_from(value).map_err(|_| "number too large".to_owned())?;
        match key.as_str() {
            "clients" => Ok(Step::Clients(n)),
            "ignoring_clients" => Ok(Step::IgnoringClients(n)),
            "scale_to" => Ok(Step::ScaleTo(n)),
            "wait_ms" => Ok(Step::WaitMs(value)),
            "balance_ms" => Ok(Step::BalanceMs(value)),
            other => Err(format!(
                "unknown step '{other}' (clients, arriving_clients, ignoring_clients, \
                 scale_to, wait_ms, balance_ms, rolling, tier_change)"
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    pub pods: usize,
    pub steps: Vec<Step>,
}

impl Scenario {
    pub fn builtin(name: &str) -> Option<Scenario> {
        use Step::*;
        let (pods, steps) = match name {
            // The user's report: 3 replicas, 20 clients, scale to 6, 20 more, back to 3.
            "seed" => (
                3,
                vec![
                    Clients(20),
                    ScaleTo(6),
                    Clients(20),
                    WaitMs(1000),
                    ScaleTo(3),
                ],
            ),
            "rolling" => (3, vec![Clients(20), WaitMs(500), Rolling]),
            "deadline" => (
                2,
                vec![Clients(10), IgnoringClients(4), WaitMs(500), ScaleTo(1)],
            ),
            // Two pods with exactly half the clients each, one removed: the close rate
            // the agent plans is clients/2 over the close window.
            "pacing" => (2, vec![Clients(80), WaitMs(500), ScaleTo(1)]),
            "scale-up" => return Some(super::fleet::scale_up_scenario()),
            _ => return None,
        };
        Some(Scenario {
            name: name.to_owned(),
            pods,
            steps,
        })
    }

    /// A built-in name or a path to a YAML file.
    pub fn load(spec: &str) -> Result<Scenario, LabError> {
        if let Some(s) = Self::builtin(spec) {
            return Ok(s);
        }
        let text = std::fs::read_to_string(spec).map_err(|e| {
            LabError::Scenario(format!(
                "'{spec}' is neither seed, rolling, deadline, pacing, scale-up, autoscale nor a readable file: {e}"
            ))
        })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Scenario, LabError> {
        let s: Scenario =
            serde_norway::from_str(text).map_err(|e| LabError::Scenario(e.to_string()))?;
        if s.pods == 0 || s.pods > 8 {
            return Err(LabError::Scenario("pods must be 1 to 8".into()));
        }
        for step in &s.steps {
            match step {
                Step::ScaleTo(n) if *n == 0 || *n > 8 => {
                    return Err(LabError::Scenario("scale_to must be 1 to 8".into()));
                }
                Step::Clients(n) | Step::IgnoringClients(n) if *n > 2000 => {
                    return Err(LabError::Scenario("at most 2000 clients per step".into()));
                }
                Step::ArrivingClients { n, every_ms }
                    if *n > 2000 || n.saturating_mul(*every_ms as usize) > 60_000 =>
                {
                    return Err(LabError::Scenario(
                        "arriving_clients: at most 2000, over at most 60 s".into(),
                    ));
                }
                Step::WaitMs(ms) | Step::BalanceMs(ms) if *ms > 60_000 => {
                    return Err(LabError::Scenario(
                        "wait_ms and balance_ms at most 60000".into(),
                    ));
                }
                _ => {}
            }
        }
        Ok(s)
    }

    /// `--clients N` replaces the count of every `clients` step.
    pub fn with_clients(mut self, n: usize) -> Scenario {
        for step in &mut self.steps {
            if let Step::Clients(c) = step {
                *c = n;
            }
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_is_the_users_story() {
        let s = Scenario::builtin("seed").unwrap();
        assert_eq!(s.pods, 3);
        assert_eq!(
            s.steps,
            vec![
                Step::Clients(20),
                Step::ScaleTo(6),
                Step::Clients(20),
                Step::WaitMs(1000),
                Step::ScaleTo(3)
            ]
        );
        assert_eq!(s.with_clients(5).steps[2], Step::Clients(5));
    }

    #[test]
    fn yaml_scenarios_parse_and_are_bounded() {
        let s = Scenario::parse(
            "name: mine\npods: 2\nsteps:\n  - clients: 10\n  - scale_to: 4\n  - wait_ms: 500\n  - rolling\n",
        )
        .unwrap();
        assert_eq!(s.steps.len(), 4);
        assert_eq!(s.steps[3], Step::Rolling);
        assert!(Scenario::parse("name: x\npods: 9\nsteps: []\n").is_err());
        assert!(Scenario::parse("name: x\npods: 1\nsteps: [{scale_to: 0}]\n").is_err());
        assert!(Scenario::parse("name: x\npods: 1\nsteps: [{fly: 1}]\n").is_err());
        assert!(Scenario::load("no-such-scenario").is_err());
        let s = Scenario::parse(
            "name: a\npods: 1\nsteps:\n  - arriving_clients: 5\n  - {arriving_clients: 3, every_ms: 50}\n  - tier_change\n",
        )
        .unwrap();
        assert_eq!(
            s.steps,
            vec![
                Step::ArrivingClients {
                    n: 5,
                    every_ms: 100
                },
                Step::ArrivingClients { n: 3, every_ms: 50 },
                Step::TierChange
            ]
        );
        assert!(
            Scenario::parse("name: x\npods: 1\nsteps: [{arriving_clients: 9, every: 1}]\n")
                .is_err()
        );
        assert!(
            Scenario::parse("name: x\npods: 1\nsteps: [{arriving_clients: 700, every_ms: 100}]\n")
                .is_err()
        );
    }
}
