//! The kubelet's pod termination order, as pure logic over an injected clock.
//!
//! Times are offsets from t0 (the moment the pod is deleted). The caller feeds events
//! (hook returned, container exited) and clock ticks; the driver answers with actions.
//! Rules (what the kubelet does; docs/lab.md, "What runs"):
//! - t0: hooks of all containers that have one start; regular containers without a hook
//!   get SIGTERM at once (a classic sidecar is such a container).
//! - a container gets SIGTERM when its own hook returns, or at the grace end if the hook
//!   is still running then (the hook is never cancelled).
//! - a native sidecar gets SIGTERM only after every regular container exited.
//! - SIGKILL at `max(grace end, SIGTERM + 2 s)`: the kubelet's minimum grace after a hook
//!   (`minimumGracePeriodInSeconds`), which is how an overrunning hook gets grace + 2 s.
//! - the endpoint leaves the ingress at t0 + propagation delay.

use std::time::Duration;

/// The kubelet never gives a container less than this between SIGTERM and SIGKILL.
pub const MIN_KILL_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A container in `containers`.
    Regular,
    /// An init container with `restartPolicy: Always`.
    NativeSidecar,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSpec {
    pub name: String,
    pub kind: Kind,
    pub pre_stop: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    pub containers: Vec<ContainerSpec>,
    pub grace: Duration,
    /// Time until the endpoint removal reaches the ingress.
    pub propagation: Duration,
}

/// What the driver asks the runtime to do; the index is into `PodSpec::containers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    RemoveEndpoint,
    StartHook(usize),
    Term(usize),
    Kill(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    HookDone(usize),
    Exited(usize),
}

#[derive(Debug, Clone, Default)]
struct State {
    hook_running: bool,
    term_at: Option<Duration>,
    killed: bool,
    exited: bool,
}

#[derive(Debug, Clone)]
pub struct Termination {
    spec: PodSpec,
    states: Vec<State>,
    endpoint_removed: bool,
}

impl Termination {
    /// Starts the termination at t0 and returns the actions due at once.
    pub fn start(spec: PodSpec) -> (Self, Vec<Action>) {
        let states = vec![State::default(); spec.containers.len()];
        let mut t = Self {
            spec,
            states,
            endpoint_removed: false,
        };
        let mut actions = Vec::new();
        for i in 0..t.spec.containers.len() {
            if t.spec.containers[i].pre_stop {
                t.states[i].hook_running = true;
                actions.push(Action::StartHook(i));
            }
        }
        actions.extend(t.step(Duration::ZERO));
        (t, actions)
    }

    pub fn on_event(&mut self, now: Duration, event: Event) -> Vec<Action> {
        match event {
            Event::HookDone(i) => {
                if let Some(s) = self.states.get_mut(i) {
                    s.hook_running = false;
                }
            }
            Event::Exited(i) => {
                if let Some(s) = self.states.get_mut(i) {
                    s.exited = true;
                    s.hook_running = false;
                }
            }
        }
        self.step(now)
    }

    /// Actions due at `now` (call at `next_wakeup` or later).
    pub fn on_time(&mut self, now: Duration) -> Vec<Action> {
        self.step(now)
    }

    /// The next time something is due without any event, if any.
    pub fn next_wakeup(&self) -> Option<Duration> {
        let mut next: Option<Duration> = None;
        let mut consider = |t: Duration| next = Some(next.map_or(t, |n| n.min(t)));
        if !self.endpoint_removed {
            consider(self.spec.propagation);
        }
        for s in &self.states {
            if s.exited || s.killed {
                continue;
            }
            match s.term_at {
                Some(term) => consider(self.kill_at(term)),
                None => consider(self.spec.grace),
            }
        }
        next
    }

    /// True once every container exited (the endpoint removal may still be pending
    /// only if the pod died before the propagation delay: it is then done anyway).
    pub fn done(&self) -> bool {
        self.states.iter().all(|s| s.exited)
    }

    fn kill_at(&self, term_at: Duration) -> Duration {
        self.spec.grace.max(term_at + MIN_KILL_GRACE)
    }

    fn regulars_exited(&self) -> bool {
        self.spec
            .containers
            .iter()
            .zip(&self.states)
            .all(|(c, s)| c.kind != Kind::Regular || s.exited)
    }

    fn step(&mut self, now: Duration) -> Vec<Action> {
        let mut actions = Vec::new();
        if !self.endpoint_removed && now >= self.spec.propagation {
            self.endpoint_removed = true;
            actions.push(Action::RemoveEndpoint);
        }
        let regulars_exited = self.regulars_exited();
        let grace_over = now >= self.spec.grace;
        for i in 0..self.states.len() {
            let s = &self.states[i];
            if s.exited || s.term_at.is_some() {
                continue;
            }
            let ready = match self.spec.containers[i].kind {
                Kind::Regular => !s.hook_running,
                Kind::NativeSidecar => !s.hook_running && regulars_exited,
            };
            if ready || grace_over {
                self.states[i].term_at = Some(now);
                actions.push(Action::Term(i));
            }
        }
        for i in 0..self.states.len() {
            let s = &self.states[i];
            if s.exited || s.killed {
                continue;
            }
            if let Some(term) = s.term_at
                && now >= self.kill_at(term)
            {
                self.states[i].killed = true;
                actions.push(Action::Kill(i));
            }
        }
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const APP: usize = 0;
    const AGENT: usize = 1;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn pod(app_hook: bool, agent: Kind) -> PodSpec {
        PodSpec {
            containers: vec![
                ContainerSpec {
                    name: "app".into(),
                    kind: Kind::Regular,
                    pre_stop: app_hook,
                },
                ContainerSpec {
                    name: "agent".into(),
                    kind: agent,
                    pre_stop: false,
                },
            ],
            grace: ms(10_000),
            propagation: ms(1_000),
        }
    }

    #[test]
    fn classic_sidecar_gets_sigterm_at_t0_app_after_its_hook() {
        let (mut t, first) = Termination::start(pod(true, Kind::Regular));
        assert_eq!(first, vec![Action::StartHook(APP), Action::Term(AGENT)]);
        assert_eq!(t.next_wakeup(), Some(ms(1_000)));
        assert_eq!(t.on_time(ms(1_000)), vec![Action::RemoveEndpoint]);
        // Nothing for the app while its hook runs.
        assert_eq!(t.on_time(ms(3_000)), vec![]);
        assert_eq!(
            t.on_event(ms(4_000), Event::HookDone(APP)),
            vec![Action::Term(APP)]
        );
        assert_eq!(t.on_event(ms(4_100), Event::Exited(APP)), vec![]);
        assert!(!t.done());
        assert_eq!(t.on_event(ms(4_200), Event::Exited(AGENT)), vec![]);
        assert!(t.done());
        assert_eq!(t.next_wakeup(), None);
    }

    #[test]
    fn native_sidecar_gets_sigterm_only_after_the_app_exited() {
        let (mut t, first) = Termination::start(pod(true, Kind::NativeSidecar));
        assert_eq!(first, vec![Action::StartHook(APP)]);
        assert_eq!(t.on_time(ms(1_000)), vec![Action::RemoveEndpoint]);
        assert_eq!(
            t.on_event(ms(4_000), Event::HookDone(APP)),
            vec![Action::Term(APP)]
        );
        assert_eq!(
            t.on_event(ms(4_500), Event::Exited(APP)),
            vec![Action::Term(AGENT)]
        );
        // The sidecar's SIGTERM is late: it still gets the 2 s minimum.
        assert_eq!(t.next_wakeup(), Some(ms(10_000)));
        assert_eq!(t.on_event(ms(4_600), Event::Exited(AGENT)), vec![]);
        assert!(t.done());
    }

    #[test]
    fn app_without_hook_gets_sigterm_at_t0() {
        let (_, first) = Termination::start(pod(false, Kind::NativeSidecar));
        assert_eq!(first, vec![Action::Term(APP)]);
        let (_, first) = Termination::start(pod(false, Kind::Regular));
        assert_eq!(first, vec![Action::Term(APP), Action::Term(AGENT)]);
    }

    #[test]
    fn overrunning_hook_gets_sigterm_at_grace_end_and_sigkill_two_seconds_later() {
        let (mut t, _) = Termination::start(pod(true, Kind::NativeSidecar));
        t.on_time(ms(1_000));
        assert_eq!(t.next_wakeup(), Some(ms(10_000)));
        // At the grace end the hook still runs: SIGTERM to the app; the native sidecar
        // gets its SIGTERM too (the kubelet is out of time for ordering).
        assert_eq!(
            t.on_time(ms(10_000)),
            vec![Action::Term(APP), Action::Term(AGENT)]
        );
        assert_eq!(t.next_wakeup(), Some(ms(12_000)));
        assert_eq!(t.on_time(ms(11_999)), vec![]);
        assert_eq!(
            t.on_time(ms(12_000)),
            vec![Action::Kill(APP), Action::Kill(AGENT)]
        );
        assert_eq!(t.next_wakeup(), None);
    }

    #[test]
    fn hook_returning_late_still_gets_two_seconds() {
        let (mut t, _) = Termination::start(pod(true, Kind::Regular));
        t.on_time(ms(1_000));
        assert_eq!(
            t.on_event(ms(9_500), Event::HookDone(APP)),
            vec![Action::Term(APP)]
        );
        // The classic sidecar (SIGTERM at t0) is killed at the grace end ...
        assert_eq!(t.on_time(ms(10_000)), vec![Action::Kill(AGENT)]);
        // ... the app at hook end + 2 s.
        assert_eq!(t.next_wakeup(), Some(ms(11_500)));
        assert_eq!(t.on_time(ms(11_500)), vec![Action::Kill(APP)]);
    }

    #[test]
    fn container_ignoring_sigterm_is_killed_at_grace_end() {
        let (mut t, first) = Termination::start(pod(false, Kind::Regular));
        assert_eq!(first, vec![Action::Term(APP), Action::Term(AGENT)]);
        t.on_time(ms(1_000));
        t.on_event(ms(2_000), Event::Exited(AGENT));
        assert_eq!(t.next_wakeup(), Some(ms(10_000)));
        assert_eq!(t.on_time(ms(10_000)), vec![Action::Kill(APP)]);
        // Killed, not yet reaped: nothing more is due.
        assert_eq!(t.on_time(ms(20_000)), vec![]);
        t.on_event(ms(10_010), Event::Exited(APP));
        assert!(t.done());
    }

    #[test]
    fn hook_status_does_not_matter_and_an_exited_container_needs_no_signal() {
        // The app dies by itself while its hook runs: no SIGTERM is sent to it.
        let (mut t, _) = Termination::start(pod(true, Kind::NativeSidecar));
        assert_eq!(
            t.on_event(ms(500), Event::Exited(APP)),
            vec![Action::Term(AGENT)]
        );
        // The hook's answer arriving later changes nothing for the dead app.
        assert_eq!(t.on_event(ms(600), Event::HookDone(APP)), vec![]);
    }

    #[test]
    fn endpoint_removal_waits_for_the_propagation_delay() {
        let mut spec = pod(true, Kind::NativeSidecar);
        spec.propagation = ms(250);
        let (mut t, _) = Termination::start(spec);
        assert_eq!(t.next_wakeup(), Some(ms(250)));
        assert_eq!(t.on_time(ms(249)), vec![]);
        assert_eq!(t.on_time(ms(250)), vec![Action::RemoveEndpoint]);
        assert_eq!(t.on_time(ms(300)), vec![]);
    }
}
