//! A lab pod: the app and (optionally) the agent sharing one loopback address, as
//! containers share a pod's network namespace; and its kubelet-faithful termination.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use nix::sys::signal::Signal;
use serde::Serialize;
use tokio::sync::mpsc;

use super::ingress::{Endpoint, Ingress};
use super::kubelet::{Action, ContainerSpec, Event, Kind, PodSpec, Termination};
use super::netns::{self, PodNs};
use super::procs::Child;
use super::{LabError, free_ports};
use crate::http1::{self, read_limited};

/// How the agent runs next to the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sidecar {
    Native,
    Classic,
}

/// Everything needed to start pods of one run.
#[derive(Debug, Clone)]
pub struct PodTemplate {
    pub wsdrain: PathBuf,
    /// `None`: the reference app. Else a shell command with {ip}, {port}, {admin_port}
    /// (in proxy mode {port} is the port behind the proxy).
    pub app_cmd: Option<String>,
    /// Agent flags beyond the addresses (timings); `None`: no agent in the pod.
    pub agent_flags: Option<Vec<String>>,
    /// Proxy mode: the app listens on the pod's second port without an admin API, and
    /// the agent takes the app port, proxies to it and closes the sessions itself.
    pub proxy: bool,
    pub sidecar: Sidecar,
    pub grace: Duration,
    pub propagation: Duration,
    /// One agent port for every pod of a loopback run, so that a static `--peers` list
    /// names every agent before it starts; `None`: a free port per pod.
    pub agent_port: Option<u16>,
}

pub struct Pod {
    pub name: String,
    pub ip: IpAddr,
    pub app_port: u16,
    pub admin_port: u16,
    pub agent_port: Option<u16>,
    pub slot: Option<String>,
    app: Child,
    agent: Option<Child>,
    /// The run's directory, where each container's log is.
    dir: PathBuf,
    /// Last field: dropped (namespace deleted) after the children got SIGKILL.
    _netns: Option<PodNs>,
}

/// What happened to one pod during its termination (times in ms from its t0).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PodReport {
    pub pod: String,
    pub slot: Option<String>,
    pub hook_ms: Option<u64>,
    pub hook_status: Option<u16>,
    /// The agent's drain outcome from the hook's answer.
    pub drain_outcome: Option<String>,
    pub endpoint_removed_ms: Option<u64>,
    pub term_ms: Vec<(String, u64)>,
    pub exit_ms: Vec<(String, u64)>,
    pub killed: Vec<String>,
    pub total_ms: u64,
}

/// Fills `{ip}`, `{port}` and `{admin_port}` of a user's app command.
pub fn fill_app_cmd(cmd: &str, ip: IpAddr, port: u16, admin_port: u16) -> String {
    cmd.replace("{ip}", &ip.to_string())
        .replace("{port}", &port.to_string())
        .replace("{admin_port}", &admin_port.to_string())
}

impl Pod {
    /// Starts the pod on `ip`: a loopback address, or with `ns` the address of its own
    /// network namespace, where it gets Kubernetes-like fixed ports.
    pub fn start(
        t: &PodTemplate,
        name: &str,
        ip: IpAddr,
        ns: Option<PodNs>,
        dir: &Path,
        run_id: &str,
    ) -> Result<Pod, LabError> {
        let [app_port, admin_port, agent_port] = match ns {
            Some(_) => [netns::APP_PORT, netns::ADMIN_PORT, netns::AGENT_PORT],
            None => {
                let [app, admin, agent] = free_ports(ip)?;
                [app, admin, t.agent_port.unwrap_or(agent)]
            }
        };
        // In its own namespace the app listens on all addresses, as in a pod, and the agent
        // reaches the admin API on the pod's loopback; `{ip}` of --app is then 0.0.0.0.
        let (bind_ip, admin_ip) = match ns {
            Some(_) => (
                IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            ),
            None => (ip, ip),
        };
        // A container's command: inside the pod's namespace when it has one.
        let command = |program: &std::ffi::OsStr| match &ns {
            Some(ns) => ns.command(program),
            None => tokio::process::Command::new(program),
        };
        // In proxy mode the app listens behind the agent, on the port the admin API
        // would have had (it has none), and the ingress keeps routing to the app port.
        let (listen_port, upstream) = if t.proxy && t.agent_flags.is_some() {
            (admin_port, Some(SocketAddr::new(admin_ip, admin_port)))
        } else {
            (app_port, None)
        };
        let app_cmd = match &t.app_cmd {
            None => {
                let mut c = command(t.wsdrain.as_os_str());
                c.args(["echo", "--listen", &format!("{bind_ip}:{listen_port}")]);
                if upstream.is_some() {
                    c.arg("--no-admin");
                } else {
                    c.args(["--admin", &format!("{admin_ip}:{admin_port}")]);
                }
                c.args(["--log-format", "json"]);
                c
            }
            Some(cmd) => {
                let mut c = command("sh".as_ref());
                c.arg("-c")
                    .arg(fill_app_cmd(cmd, bind_ip, listen_port, admin_port));
                c
            }
        };
        let app = Child::spawn(
            &format!("{name}/app"),
            app_cmd,
            run_id,
            &dir.join(format!("{name}-app.log")),
        )?;
        let (agent, agent_port) = match &t.agent_flags {
            None => (None, None),
            Some(flags) => {
                let mut c = command(t.wsdrain.as_os_str());
                match ns {
                    // As in a real pod: the namespace isolates the count, the hook comes
                    // from the node (the kubelet's HOST_IP).
                    Some(_) => {
                        c.args(["agent", "--listen", &format!("0.0.0.0:{agent_port}")])
                            .args(["--trigger-from", &netns::NODE_IP.to_string()]);
                    }
                    None => {
                        c.args(["agent", "--listen", &format!("{ip}:{agent_port}")])
                            .args(["--address", &ip.to_string()]);
                    }
                };
                match upstream {
                    Some(up) => c.args(["--proxy", &format!("{bind_ip}:{app_port}={up}")]),
                    None => c
                        .args(["--ports", &app_port.to_string()])
                        .args(["--admin-url", &format!("http://{admin_ip}:{admin_port}")]),
                };
                c.args(["--grace-period", &format!("{}ms", t.grace.as_millis())])
                    .arg("--termination-log")
                    .arg(dir.join(format!("{name}-termination.log")))
                    .arg("--no-kube")
                    .args(flags)
                    .env_remove("POD_NAME")
                    .env_remove("POD_NAMESPACE");
                let log = dir.join(format!("{name}-agent.log"));
                let child = Child::spawn(&format!("{name}/agent"), c, run_id, &log)?;
                (Some(child), Some(agent_port))
            }
        };
        Ok(Pod {
            name: name.to_owned(),
            ip,
            app_port,
            admin_port,
            agent_port,
            slot: None,
            app,
            agent,
            dir: dir.to_owned(),
            _netns: ns,
        })
    }

    /// Process ids of the app and the agent (if any), for the soak's samples.
    pub fn pids(&self) -> (i32, Option<i32>) {
        (self.app.pid(), self.agent.as_ref().map(Child::pid))
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            addr: SocketAddr::new(self.ip, self.app_port),
            check_port: self.agent_port.unwrap_or(self.app_port),
        }
    }

    /// Waits until the app listens and the agent's /readyz answers 200.
    pub async fn wait_ready(&self, limit: Duration) -> Result<(), LabError> {
        let end = Instant::now() + limit;
        let app = SocketAddr::new(self.ip, self.app_port);
        loop {
            let app_up = tokio::net::TcpStream::connect(app).await.is_ok();
            let agent_up = match self.agent_port {
                None => true,
                Some(p) => {
                    let req = http_get(SocketAddr::new(self.ip, p), "/readyz", "wsdrain-lab");
                    matches!(
                        tokio::time::timeout(Duration::from_secs(1), req).await,
                        Ok(Ok((200, _)))
                    )
                }
            };
            if app_up && agent_up {
                return Ok(());
            }
            for c in std::iter::once(&self.app).chain(self.agent.iter()) {
                if let Some(status) = c.exited() {
                    // The container's last words say why (e.g. a port taken).
                    let log = self.dir.join(format!("{}.log", c.name.replace('/', "-")));
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(3).collect();
                    return Err(LabError::Pod(format!(
                        "{} exited at start: {status}; its log ends: {}",
                        c.name,
                        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                    )));
                }
            }
            if Instant::now() > end {
                return Err(LabError::Pod(format!(
                    "{} not ready after {limit:?} (app up: {app_up}, agent ready: {agent_up})",
                    self.name
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Deletes the pod the way the kubelet does (see `kubelet`), driving signals,
    /// the preStop hook and the endpoint removal in real time.
    pub async fn terminate(&self, t: &PodTemplate, ingress: &Ingress) -> PodReport {
        let mut containers = vec![ContainerSpec {
            name: "app".into(),
            kind: Kind::Regular,
            pre_stop: self.agent.is_some(),
        }];
        let mut procs = vec![&self.app];
        if let Some(agent) = &self.agent {
            containers.push(ContainerSpec {
                name: "agent".into(),
                kind: match t.sidecar {
                    Sidecar::Native => Kind::NativeSidecar,
                    Sidecar::Classic => Kind::Regular,
                },
                pre_stop: false,
            });
            procs.push(agent);
        }
        let spec = PodSpec {
            containers: containers.clone(),
            grace: t.grace,
            propagation: t.propagation,
        };
        let mut report = PodReport {
            pod: self.name.clone(),
            slot: self.slot.clone(),
            ..Default::default()
        };
        let ms = |d: Duration| d.as_millis() as u64;
        let (events, mut rx) = mpsc::channel::<(Event, Option<(u16, String)>)>(8);
        for (i, p) in procs.iter().enumerate() {
            let mut exit = p.exit_watch();
            let tx = events.clone();
            tokio::spawn(async move {
                let _ = exit.wait_for(Option::is_some).await;
                let _ = tx.send((Event::Exited(i), None)).await;
            });
        }
        let (mut term, mut actions) = Termination::start(spec);
        // t0 is the kubelet's start of termination, after the lab's own bookkeeping: the
        // first actions (SIGTERM to a classic sidecar) are decided at 0 ms, as in a cluster.
        let t0 = Instant::now();
        // When the kubelet decided the actions at hand. Reports record it, so that the
        // lab's own delay in carrying them out is not mistaken for the kubelet's order.
        let mut decided = Duration::ZERO;
        // Bound the loop: the kubelet would be done by grace + 2 s; allow slack.
        let hard_end = t0 + t.grace + Duration::from_secs(10);
        loop {
            for a in actions.drain(..) {
                match a {
                    Action::RemoveEndpoint => {
                        report.endpoint_removed_ms = Some(ms(decided));
                        if let Some(slot) = &self.slot
                            && let Err(e) = ingress.remove(slot).await
                        {
                            tracing::warn!(pod = %self.name, error = %e, "endpoint removal failed");
                        }
                    }
                    Action::StartHook(i) => {
                        let Some(port) = self.agent_port else {
                            continue;
                        };
                        let addr = SocketAddr::new(self.ip, port);
                        let tx = events.clone();
                        // The kubelet's httpGet hook: no client timeout, status ignored.
                        tokio::spawn(async move {
                            let answer =
                                http_get(addr, "/prestop", "kube-lifecycle/1.33").await.ok();
                            let _ = tx.send((Event::HookDone(i), answer)).await;
                        });
                    }
                    Action::Term(i) => {
                        report
                            .term_ms
                            .push((containers[i].name.clone(), ms(decided)));
                        procs[i].signal(Signal::SIGTERM);
                    }
                    Action::Kill(i) => {
                        report.killed.push(containers[i].name.clone());
                        procs[i].signal(Signal::SIGKILL);
                    }
                }
            }
            // The endpoint removal propagates on its own clock, even for a dead pod.
            if term.done() && report.endpoint_removed_ms.is_some() {
                break;
            }
            let now = Instant::now();
            if now > hard_end {
                tracing::warn!(pod = %self.name, "termination overran; killing");
                for p in &procs {
                    p.kill().await;
                }
                break;
            }
            let wake = term
                .next_wakeup()
                .map_or(hard_end, |w| (t0 + w).min(hard_end));
            tokio::select! {
                got = rx.recv() => {
                    let Some((ev, answer)) = got else { break };
                    decided = t0.elapsed();
                    if let Event::HookDone(_) = ev {
                        report.hook_ms = Some(ms(decided));
                        if let Some((status, body)) = answer {
                            report.hook_status = Some(status);
                            report.drain_outcome = serde_json::from_str::<serde_json::Value>(&body)
                                .ok()
                                .and_then(|v| v.get("outcome")?.as_str().map(str::to_owned));
                        }
                    }
                    if let Event::Exited(i) = ev {
                        report.exit_ms.push((containers[i].name.clone(), ms(decided)));
                    }
                    actions = term.on_event(decided, ev);
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    decided = t0.elapsed();
                    actions = term.on_time(decided);
                }
            }
        }
        report.total_ms = ms(t0.elapsed());
        report
    }

    /// Kills what is left of the pod (end of run).
    pub async fn kill(&self) {
        self.app.kill().await;
        if let Some(a) = &self.agent {
            a.kill().await;
        }
    }
}

/// An HTTP GET through the shared client, without timeout (callers add one when they
/// want it): the status and the body (at most 1 MiB: a hook answer is small).
pub async fn http_get(addr: SocketAddr, path: &str, agent: &str) -> Result<(u16, String), String> {
    let uri: hyper::Uri = format!("http://{addr}")
        .parse()
        .map_err(|e| format!("{addr}: {e}"))?;
    let ep = http1::Endpoint::parse(&uri).map_err(str::to_owned)?;
    let stream = ep.connect().await.map_err(|e| e.to_string())?;
    let (mut sender, _conn) = http1::handshake(stream).await.map_err(|e| e.to_string())?;
    let req = hyper::Request::get(ep.target(path))
        .header(hyper::header::HOST, ep.authority.as_str())
        .header(hyper::header::USER_AGENT, agent)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let (body, _complete) = read_limited(resp.into_body(), 1 << 20)
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_placeholders() {
        let ip: IpAddr = "127.3.4.5".parse().unwrap();
        assert_eq!(
            fill_app_cmd(
                "app --bind {ip}:{port} --admin {ip}:{admin_port}",
                ip,
                80,
                81
            ),
            "app --bind 127.3.4.5:80 --admin 127.3.4.5:81"
        );
    }
}
