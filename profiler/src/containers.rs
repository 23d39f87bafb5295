//! Container attribution: from a process's cgroup path to the container it
//! runs in (Docker, containerd, CRI-O, Podman; cgroup v1 and v2, cgroupfs
//! and systemd drivers), the Kubernetes pod uid, and the ECS task (its id
//! from the path; its ARN, family and container name from the ECS agent's
//! introspection endpoint when it answers).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::mpsc,
    time::{Duration, Instant},
};

/// What a cgroup path says about the container of a process.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Container {
    /// Full container id (64 hex digits).
    pub id: String,
    /// Runtime that named the cgroup: `docker`, `containerd`, `cri-o`,
    /// `podman`, or `cri` (a Kubernetes cgroupfs path that does not say).
    pub runtime: &'static str,
    /// Kubernetes pod uid, when under `kubepods`.
    pub pod_uid: Option<String>,
    /// ECS task id, when under `ecs`.
    pub ecs_task_id: Option<String>,
    /// Name from the ECS agent (`family/container`), when it answered.
    pub name: Option<String>,
    /// ECS task ARN, when the agent answered.
    pub ecs_task_arn: Option<String>,
}

impl Container {
    /// The first 12 digits of the id, as `docker ps` shows it.
    pub fn short_id(&self) -> &str {
        &self.id[..self.id.len().min(12)]
    }

    /// How the container is named in flame graphs and metric labels: the
    /// ECS name when known, else `runtime:short-id`.
    pub fn label(&self) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None => format!("{}:{}", self.runtime, self.short_id()),
        }
    }
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A 64-hex container id inside one path component, with the runtime its
/// prefix names (`docker-<id>.scope`, `cri-containerd-<id>.scope`,
/// `crio-<id>.scope`, `libpod-<id>.scope`, or a bare `<id>`).
fn container_in(component: &str) -> Option<(&str, Option<&'static str>)> {
    let stem = component.strip_suffix(".scope").unwrap_or(component);
    let prefixes: [(&str, &'static str); 5] = [
        ("docker-", "docker"),
        ("cri-containerd-", "containerd"),
        ("crio-", "cri-o"),
        ("libpod-", "podman"),
        ("containerd-", "containerd"),
    ];
    for (prefix, runtime) in prefixes {
        if let Some(id) = stem.strip_prefix(prefix)
            && id.len() == 64
            && is_hex(id)
        {
            return Some((id, Some(runtime)));
        }
    }
    (stem.len() == 64 && is_hex(stem)).then_some((stem, None))
}

/// A pod uid in a path component: `pod<uid>` (cgroupfs driver) or
/// `kubepods-<qos>-pod<uid with _ for ->.slice` (systemd driver).
fn pod_in(component: &str) -> Option<String> {
    let stem = component.strip_suffix(".slice").unwrap_or(component);
    let at = stem.rfind("pod")?;
    let uid = stem[at + 3..].replace('_', "-");
    let ok = uid.len() == 36
        && uid.split('-').map(str::len).eq([8usize, 4, 4, 4, 12])
        && uid.split('-').all(is_hex);
    ok.then_some(uid)
}

/// The container of a process, from its cgroup path; None for host
/// processes. The innermost container id of the path wins (a container
/// in a container is named by its own id).
pub fn from_cgroup(path: &str) -> Option<Container> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let (idx, id, runtime) = parts
        .iter()
        .enumerate()
        .rev()
        .find_map(|(i, p)| container_in(p).map(|(id, rt)| (i, id, rt)))?;
    let under = |name: &str| parts[..idx].iter().any(|p| p.starts_with(name));
    let pod_uid = parts[..idx].iter().rev().find_map(|p| pod_in(p));
    // ECS on EC2: /ecs/<task id>/<container id> (v1 and v2).
    let ecs_task_id = parts[..idx]
        .windows(2)
        .find(|w| w[0] == "ecs" && is_hex(&w[1].replace('-', "")))
        .map(|w| w[1].to_string());
    let runtime = runtime.unwrap_or(if under("docker") || ecs_task_id.is_some() {
        "docker"
    } else if under("kubepods") {
        "cri"
    } else {
        "container"
    });
    Some(Container {
        id: id.to_string(),
        runtime,
        pod_uid,
        ecs_task_id,
        name: None,
        ecs_task_arn: None,
    })
}

/// One container as the ECS agent describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EcsContainer {
    /// Task ARN.
    pub task_arn: String,
    /// Task definition family.
    pub family: String,
    /// Container name in the task definition.
    pub name: String,
}

/// Parses the ECS agent's `/v1/tasks` answer: Docker id -> container.
pub fn parse_ecs_tasks(json: &str) -> HashMap<String, EcsContainer> {
    let mut out = HashMap::new();
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return out;
    };
    for task in v["Tasks"].as_array().into_iter().flatten() {
        let arn = task["Arn"].as_str().unwrap_or_default();
        let family = task["Family"].as_str().unwrap_or_default();
        for c in task["Containers"].as_array().into_iter().flatten() {
            if let (Some(id), Some(name)) = (c["DockerId"].as_str(), c["Name"].as_str()) {
                out.insert(
                    id.to_string(),
                    EcsContainer {
                        task_arn: arn.to_string(),
                        family: family.to_string(),
                        name: name.to_string(),
                    },
                );
            }
        }
    }
    out
}

/// The ECS agent's introspection endpoint on an ECS-on-EC2 host.
pub const ECS_AGENT: &str = "127.0.0.1:51678";

/// Names containers, asking the ECS agent when a container under `/ecs/`
/// is not known yet (at most every 30 s). The question runs on a thread of
/// its own: a daemon's loop never waits on the agent (the answer names
/// the containers from then on); a one-shot capture waits up to `wait`.
#[derive(Debug)]
pub struct Attributor {
    agent: Option<SocketAddr>,
    wait: Duration,
    ecs: HashMap<String, EcsContainer>,
    last_ask: Option<Instant>,
    pending: Option<mpsc::Receiver<Result<String, ureq::Error>>>,
    /// The last failure reported, not repeated.
    last_error: Option<String>,
    cache: HashMap<String, Option<Container>>,
}

/// Most cgroup paths remembered.
const MAX_CACHED: usize = 16 * 1024;

/// How long one question to the agent may take.
const AGENT_TIMEOUT: Duration = Duration::from_secs(1);

impl Attributor {
    /// An attributor asking the ECS agent at `agent` (None: never),
    /// never waiting for its answer.
    pub fn new(agent: Option<SocketAddr>) -> Self {
        Self::waiting(agent, Duration::ZERO)
    }

    /// An attributor that waits up to `wait` for the agent's answer when
    /// it asks.
    pub fn waiting(agent: Option<SocketAddr>, wait: Duration) -> Self {
        Attributor {
            agent,
            wait,
            ecs: HashMap::new(),
            last_ask: None,
            pending: None,
            last_error: None,
            cache: HashMap::new(),
        }
    }

    /// The container of a process whose cgroup is `cgroup`.
    pub fn container(&mut self, cgroup: Option<&str>) -> Option<Container> {
        let path = cgroup?;
        self.take_answer(Duration::ZERO);
        if let Some(c) = self.cache.get(path)
            && c.as_ref()
                .is_none_or(|c| c.ecs_task_id.is_none() || c.name.is_some())
        {
            return c.clone();
        }
        let mut c = from_cgroup(path);
        if let Some(c) = c.as_mut()
            && c.ecs_task_id.is_some()
        {
            if !self.ecs.contains_key(&c.id) {
                self.ask_agent();
            }
            if let Some(e) = self.ecs.get(&c.id) {
                c.name = Some(format!("{}/{}", e.family, e.name));
                c.ecs_task_arn = Some(e.task_arn.clone());
            }
        }
        if self.cache.len() >= MAX_CACHED {
            self.cache.clear();
        }
        self.cache.insert(path.to_string(), c.clone());
        c
    }

    fn ask_agent(&mut self) {
        let Some(agent) = self.agent else { return };
        if self.pending.is_none()
            && self
                .last_ask
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(30))
        {
            self.last_ask = Some(Instant::now());
            let (tx, rx) = mpsc::channel();
            let asked = std::thread::Builder::new()
                .name("ecs-agent".into())
                .spawn(move || {
                    let answer = http_get(agent, "/v1/tasks", AGENT_TIMEOUT);
                    // The attributor is gone: nobody to tell.
                    let _ = tx.send(answer);
                });
            match asked {
                Ok(_) => self.pending = Some(rx),
                Err(e) => self.report(format!("cannot ask the ECS agent: {e}")),
            }
        }
        self.take_answer(self.wait);
    }

    /// Takes the agent's answer if it has come (waiting up to `wait`).
    fn take_answer(&mut self, wait: Duration) {
        let Some(rx) = &self.pending else { return };
        let agent = self.agent.map_or_else(String::new, |a| a.to_string());
        let answer = match rx.recv_timeout(wait) {
            Ok(answer) => answer.map_err(|e| format!("ECS agent at {agent}: {e}")),
            Err(mpsc::RecvTimeoutError::Timeout) => return,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(format!("the thread asking the ECS agent at {agent} ended"))
            }
        };
        self.pending = None;
        match answer {
            Ok(body) => {
                let tasks = parse_ecs_tasks(&body);
                if !tasks.is_empty() {
                    self.ecs = tasks;
                    // Containers seen unnamed are named from now on.
                    self.cache
                        .retain(|_, c| c.as_ref().is_none_or(|c| c.ecs_task_id.is_none()));
                }
            }
            Err(e) => self.report(e),
        }
    }

    fn report(&mut self, e: String) {
        if self.last_error.as_ref() != Some(&e) {
            eprintln!("profiler: containers keep their ids as names: {e}");
            self.last_error = Some(e);
        }
    }
}

/// The root frame of `--group-by container` for a process: its
/// container's label, or `host`.
pub fn group_of(
    tgid: u32,
    procs: &crate::procs::ProcessTable,
    attributor: &mut Attributor,
) -> String {
    if tgid == 0 {
        return "host".to_string();
    }
    procs
        .get(tgid)
        .and_then(|p| attributor.container(p.cgroup.as_deref()))
        .map_or_else(|| "host".to_string(), |c| c.label())
}

/// An HTTP GET of `path` at `addr` (plain HTTP), the whole exchange
/// bounded by `timeout`; the body of a 2xx answer.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String, ureq::Error> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .build()
        .into();
    agent
        .get(&format!("http://{addr}{path}"))
        .call()?
        .body_mut()
        .with_config()
        .limit(8 << 20)
        .read_to_string()
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    const ID: &str = "3f1a2b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7a8";

    #[test]
    fn docker_cgroupfs_and_systemd() {
        let c = from_cgroup(&format!("/docker/{ID}")).unwrap();
        assert_eq!((c.id.as_str(), c.runtime), (ID, "docker"));
        assert_eq!(c.short_id(), &ID[..12]);
        let c = from_cgroup(&format!("/system.slice/docker-{ID}.scope")).unwrap();
        assert_eq!((c.id.as_str(), c.runtime), (ID, "docker"));
        assert_eq!(c.label(), format!("docker:{}", &ID[..12]));
    }

    #[test]
    fn kubernetes_containerd_and_crio() {
        let uid = "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9";
        let systemd = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope",
            uid.replace('-', "_")
        );
        let c = from_cgroup(&systemd).unwrap();
        assert_eq!(c.runtime, "containerd");
        assert_eq!(c.pod_uid.as_deref(), Some(uid));
        let cgroupfs = format!("/kubepods/besteffort/pod{uid}/{ID}");
        let c = from_cgroup(&cgroupfs).unwrap();
        assert_eq!((c.runtime, c.pod_uid.as_deref()), ("cri", Some(uid)));
        let crio = format!(
            "/kubepods.slice/kubepods-pod{}.slice/crio-{ID}.scope",
            uid.replace('-', "_")
        );
        let c = from_cgroup(&crio).unwrap();
        assert_eq!((c.runtime, c.pod_uid.as_deref()), ("cri-o", Some(uid)));
    }

    #[test]
    fn ecs_task_and_podman() {
        let task = "8e4f3c2b1a0d4e5f9a8b7c6d5e4f3a2b";
        let c = from_cgroup(&format!("/ecs/{task}/{ID}")).unwrap();
        assert_eq!(c.ecs_task_id.as_deref(), Some(task));
        assert_eq!(c.runtime, "docker");
        let c = from_cgroup(&format!("/machine.slice/libpod-{ID}.scope/container")).unwrap();
        assert_eq!(c.runtime, "podman");
    }

    #[test]
    fn host_processes_have_none() {
        for p in [
            "/",
            "/user.slice/user-0.slice/session-3.scope",
            "/system.slice/sshd.service",
            "/kubepods.slice/kubepods-burstable.slice",
            "/docker/not-an-id",
        ] {
            assert_eq!(from_cgroup(p), None, "{p}");
        }
    }

    /// The agent's answer over HTTP, as the agent serves it on
    /// 127.0.0.1:51678 (the agent itself only runs on ECS instances).
    #[test]
    fn asks_the_agent_once_and_names_the_container() {
        use std::net::TcpListener;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let body = format!(
            r#"{{"Tasks":[{{"Arn":"arn:aws:ecs:us-east-1:1:task/prod/8e4f3c2b1a0d4e5f9a8b7c6d5e4f3a2b","Family":"checkout","Version":"7","Containers":[{{"DockerId":"{ID}","Name":"api"}}]}}]}}"#
        );
        let server = std::thread::spawn(move || {
            let mut served = 0;
            listener.set_nonblocking(false).unwrap();
            if let Ok((mut s, _)) = listener.accept() {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    req.extend_from_slice(&buf[..n]);
                }
                assert!(String::from_utf8_lossy(&req).starts_with("GET /v1/tasks "));
                write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
                served += 1;
            }
            served
        });
        let mut a = Attributor::waiting(Some(addr), Duration::from_secs(5));
        let path = format!("/ecs/8e4f3c2b1a0d4e5f9a8b7c6d5e4f3a2b/{ID}");
        let c = a.container(Some(&path)).unwrap();
        assert_eq!(c.name.as_deref(), Some("checkout/api"));
        assert_eq!(c.label(), "checkout/api");
        assert!(
            c.ecs_task_arn
                .unwrap()
                .ends_with("task/prod/8e4f3c2b1a0d4e5f9a8b7c6d5e4f3a2b")
        );
        // Known now: no second question.
        assert_eq!(a.container(Some(&path)).unwrap().label(), "checkout/api");
        assert_eq!(server.join().unwrap(), 1);
        // No agent: the runtime's id names it, without waiting long.
        let mut none = Attributor::new(Some("127.0.0.1:1".parse().unwrap()));
        let t = std::time::Instant::now();
        assert_eq!(
            none.container(Some(&path)).unwrap().label(),
            format!("docker:{}", &ID[..12])
        );
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn ecs_agent_answer() {
        let json = format!(
            r#"{{"Tasks":[{{"Arn":"arn:aws:ecs:eu-west-1:1:task/c/8e4f","DesiredStatus":"RUNNING","Family":"web","Version":"3","Containers":[{{"DockerId":"{ID}","DockerName":"ecs-web-3-app","Name":"app"}}]}}]}}"#
        );
        let m = parse_ecs_tasks(&json);
        assert_eq!(m[ID].family, "web");
        assert_eq!(m[ID].name, "app");
        assert!(m[ID].task_arn.ends_with("task/c/8e4f"));
        assert!(parse_ecs_tasks("not json").is_empty());
    }
}
