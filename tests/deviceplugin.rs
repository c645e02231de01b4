//! `kfdmux device-plugin` against a fake kubelet: registration, ListAndWatch health updates,
//! Allocate answers and errors, re-registration after a kubelet restart, SIGTERM clean-up.
//! No root needed: the instances' "kfd files" are plain files in a temporary directory.
#![cfg(feature = "deviceplugin")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kfdmux::deviceplugin::api::device_plugin_client::DevicePluginClient;
use kfdmux::deviceplugin::api::registration_server::{Registration, RegistrationServer};
use kfdmux::deviceplugin::api::{
    AllocateRequest, ContainerAllocateRequest, ContainerPreferredAllocationRequest, Empty,
    ListAndWatchResponse, PreferredAllocationRequest, RegisterRequest,
};
use kfdmux::deviceplugin::connect_unix;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status, Streaming};

/// Every wait in this file is bounded by this.
const LIMIT: Duration = Duration::from_secs(10);

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        // Short: Unix socket paths are limited to 107 bytes.
        let p = std::env::temp_dir().join(format!("kfdmux-dp-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The plugin process; killed if the test ends early. Its stderr goes to a file we print on
/// failure.
struct PluginProc {
    child: Child,
    log: PathBuf,
}

impl PluginProc {
    fn start(cfg: &Path, dir: &Path, extra: &[&str]) -> PluginProc {
        let log = dir.join("plugin.log");
        let err = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_kfdmux"))
            .arg("device-plugin")
            .arg("--config")
            .arg(cfg)
            .arg("--plugin-dir")
            .arg(dir)
            .args(["--health-interval-ms", "50"])
            .args(extra)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn kfdmux device-plugin");
        PluginProc { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) for the process to exit.
    async fn wait_exit(&mut self) -> Option<std::process::ExitStatus> {
        let end = tokio::time::Instant::now() + LIMIT;
        while tokio::time::Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for PluginProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A kubelet's Registration service that hands every request to the test.
struct FakeKubelet {
    tx: mpsc::UnboundedSender<RegisterRequest>,
    /// Refuse every registration with this message (as the kubelet does: gRPC Unknown).
    refuse: Option<&'static str>,
}

#[tonic::async_trait]
impl Registration for FakeKubelet {
    async fn register(&self, req: Request<RegisterRequest>) -> Result<Response<Empty>, Status> {
        let _ = self.tx.send(req.into_inner());
        match self.refuse {
            Some(m) => Err(Status::unknown(m)),
            None => Ok(Response::new(Empty {})),
        }
    }
}

fn start_kubelet(dir: &Path) -> (JoinHandle<()>, mpsc::UnboundedReceiver<RegisterRequest>) {
    start_kubelet_with(dir, None)
}

fn start_kubelet_with(
    dir: &Path,
    refuse: Option<&'static str>,
) -> (JoinHandle<()>, mpsc::UnboundedReceiver<RegisterRequest>) {
    let sock = dir.join("kubelet.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock).expect("bind kubelet.sock");
    let (tx, rx) = mpsc::unbounded_channel();
    let h = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(RegistrationServer::new(FakeKubelet { tx, refuse }))
            .serve_with_incoming(UnixListenerStream::new(listener))
            .await
            .expect("fake kubelet");
    });
    (h, rx)
}

fn write_config(dir: &Path) -> PathBuf {
    for n in ["a", "b"] {
        std::fs::create_dir_all(dir.join(n)).expect("mount dir");
        std::fs::write(dir.join(n).join("kfd"), b"").expect("kfd file");
    }
    let d = dir.display();
    let text = format!(
        r#"[daemon]
state_dir = "{d}/state"

[[instance]]
name = "a"
gpus = "gfx90a"
mount = "{d}/a"

[[instance]]
name = "b"
gpus = "gfx1030"
mount = "{d}/b"
"#
    );
    let p = dir.join("kfdmux.toml");
    std::fs::write(&p, text).expect("config");
    p
}

async fn next_register(
    rx: &mut mpsc::UnboundedReceiver<RegisterRequest>,
    plugin: &PluginProc,
) -> RegisterRequest {
    match tokio::time::timeout(LIMIT, rx.recv()).await {
        Ok(Some(r)) => r,
        _ => panic!(
            "no Register within {LIMIT:?}; plugin log:\n{}",
            plugin.log()
        ),
    }
}

/// Connects to the plugin's socket as the kubelet does (retrying until it exists).
async fn connect_plugin(sock: &Path) -> DevicePluginClient<Channel> {
    let end = tokio::time::Instant::now() + LIMIT;
    loop {
        if sock.exists() {
            if let Ok(Ok(ch)) = tokio::time::timeout(LIMIT, connect_unix(sock)).await {
                return DevicePluginClient::new(ch);
            }
        }
        assert!(
            tokio::time::Instant::now() < end,
            "cannot connect to {}",
            sock.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn health_of(list: &ListAndWatchResponse) -> Vec<(String, String)> {
    list.devices
        .iter()
        .map(|d| (d.id.clone(), d.health.clone()))
        .collect()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// Reads ListAndWatch messages until one equals `want` (bounded).
async fn until_list(
    stream: &mut Streaming<ListAndWatchResponse>,
    want: &[(&str, &str)],
    plugin: &PluginProc,
) {
    let want = pairs(want);
    let end = tokio::time::Instant::now() + LIMIT;
    let mut seen = Vec::new();
    loop {
        let msg = match tokio::time::timeout_at(end, stream.message()).await {
            Ok(Ok(Some(m))) => m,
            other => panic!(
                "ListAndWatch never showed {want:?} (saw {seen:?}, then {other:?}); plugin log:\n{}",
                plugin.log()
            ),
        };
        let h = health_of(&msg);
        if h == want {
            return;
        }
        seen.push(h);
    }
}

async fn allocate(
    client: &mut DevicePluginClient<Channel>,
    ids: &[&str],
) -> Result<kfdmux::deviceplugin::api::AllocateResponse, Status> {
    let req = AllocateRequest {
        container_requests: vec![ContainerAllocateRequest {
            devices_ids: ids.iter().map(|s| s.to_string()).collect(),
        }],
    };
    tokio::time::timeout(LIMIT, client.allocate(req))
        .await
        .expect("Allocate timed out")
        .map(Response::into_inner)
}

#[tokio::test]
async fn registers_watches_allocates_and_reregisters() {
    let tmp = TempDir::new("main");
    let dir = tmp.0.clone();
    let cfg = write_config(&dir);
    let (kubelet, mut regs) = start_kubelet(&dir);
    let mut plugin = PluginProc::start(&cfg, &dir, &[]);

    // Register: the resource, the API version and our socket's name in the plugin directory.
    let r = next_register(&mut regs, &plugin).await;
    assert_eq!(r.version, "v1beta1");
    assert_eq!(r.endpoint, "kfdmux.sock");
    assert_eq!(r.resource_name, "kfdmux.dev/gpu");
    let opts = r.options.expect("options");
    assert!(!opts.pre_start_required);
    assert!(opts.get_preferred_allocation_available);

    let sock = dir.join("kfdmux.sock");
    let mut client = connect_plugin(&sock).await;
    let o = client
        .get_device_plugin_options(Empty {})
        .await
        .expect("GetDevicePluginOptions")
        .into_inner();
    assert_eq!(o, opts);

    // The first list: both instances, healthy (their kfd files exist).
    let mut stream = client
        .list_and_watch(Empty {})
        .await
        .expect("ListAndWatch")
        .into_inner();
    let first = tokio::time::timeout(LIMIT, stream.message())
        .await
        .expect("first ListAndWatch message in time")
        .expect("ListAndWatch message")
        .expect("stream open");
    assert_eq!(
        health_of(&first),
        pairs(&[("a", "Healthy"), ("b", "Healthy")])
    );

    // Allocate a healthy device: its CDI name, as a CDI device and as the annotation.
    let resp = allocate(&mut client, &["a"]).await.expect("Allocate a");
    assert_eq!(resp.container_responses.len(), 1);
    let c = &resp.container_responses[0];
    let names: Vec<&str> = c.cdi_devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["kfdmux.dev/gpu=a"]);
    assert_eq!(
        c.annotations.get("cdi.k8s.io/kfdmux_a").map(String::as_str),
        Some("kfdmux.dev/gpu=a")
    );
    assert_eq!(c.annotations.len(), 1);
    assert!(c.envs.is_empty() && c.mounts.is_empty() && c.devices.is_empty());

    // Unknown device, and two devices for one container (both would be /dev/kfd).
    let e = allocate(&mut client, &["nope"])
        .await
        .expect_err("unknown id");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("nope"), "{e:?}");
    let e = allocate(&mut client, &["a", "b"])
        .await
        .expect_err("two devices");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // b's kfd file goes: a later list shows it unhealthy, and it cannot be allocated.
    std::fs::remove_file(dir.join("b/kfd")).expect("remove b/kfd");
    until_list(
        &mut stream,
        &[("a", "Healthy"), ("b", "Unhealthy")],
        &plugin,
    )
    .await;
    let e = allocate(&mut client, &["b"])
        .await
        .expect_err("unhealthy b");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // The preferred allocation puts healthy devices first.
    let pref = client
        .get_preferred_allocation(PreferredAllocationRequest {
            container_requests: vec![ContainerPreferredAllocationRequest {
                available_device_i_ds: vec!["b".into(), "a".into()],
                must_include_device_i_ds: vec![],
                allocation_size: 1,
            }],
        })
        .await
        .expect("GetPreferredAllocation")
        .into_inner();
    assert_eq!(pref.container_responses.len(), 1);
    assert_eq!(pref.container_responses[0].device_i_ds, ["a"]);

    // It comes back.
    std::fs::write(dir.join("b/kfd"), b"").expect("restore b/kfd");
    until_list(&mut stream, &[("a", "Healthy"), ("b", "Healthy")], &plugin).await;
    drop(stream);
    drop(client);

    // A kubelet restart: it removes every socket in the directory and makes a new kubelet.sock.
    kubelet.abort();
    let _ = kubelet.await;
    drop(regs);
    std::fs::remove_file(&sock).expect("remove kfdmux.sock");
    std::fs::remove_file(dir.join("kubelet.sock")).expect("remove kubelet.sock");
    let (kubelet, mut regs) = start_kubelet(&dir);
    let r = next_register(&mut regs, &plugin).await;
    assert_eq!(r.endpoint, "kfdmux.sock");
    assert_eq!(r.resource_name, "kfdmux.dev/gpu");
    // ... and it serves on a new socket.
    let mut client = connect_plugin(&sock).await;
    let mut stream = client
        .list_and_watch(Empty {})
        .await
        .expect("ListAndWatch after restart")
        .into_inner();
    until_list(&mut stream, &[("a", "Healthy"), ("b", "Healthy")], &plugin).await;
    let resp = allocate(&mut client, &["b"]).await.expect("Allocate b");
    let names: Vec<&str> = resp.container_responses[0]
        .cdi_devices
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    assert_eq!(names, ["kfdmux.dev/gpu=b"]);

    // SIGTERM: exits 0 and removes its socket.
    // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
    let rc = unsafe { libc::kill(plugin.child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let st = plugin.wait_exit().await.expect("exit after SIGTERM");
    assert!(st.success(), "{st:?}; log:\n{}", plugin.log());
    assert!(!sock.exists(), "kfdmux.sock left behind");
    let log = plugin.log();
    assert!(log.contains("kubelet restart"), "{log}");
    kubelet.abort();
}

#[tokio::test]
async fn custom_resource_name_and_waiting_for_the_kubelet() {
    let tmp = TempDir::new("res");
    let dir = tmp.0.clone();
    let cfg = write_config(&dir);
    // The plugin starts before the kubelet: it serves and keeps trying to register.
    let plugin = PluginProc::start(&cfg, &dir, &["--resource", "example.com/kfd"]);
    let _client = connect_plugin(&dir.join("kfdmux.sock")).await;
    let (kubelet, mut regs) = start_kubelet(&dir);
    let r = next_register(&mut regs, &plugin).await;
    assert_eq!(r.resource_name, "example.com/kfd");
    kubelet.abort();
}

#[tokio::test]
async fn bad_arguments_fail() {
    let tmp = TempDir::new("bad");
    let dir = tmp.0.clone();
    let cfg = write_config(&dir);
    let mut p = PluginProc::start(&cfg, &dir, &["--resource", "noslash"]);
    let st = p.wait_exit().await.expect("exits");
    assert_eq!(st.code(), Some(1));
    assert!(p.log().contains("<domain>/<name>"), "{}", p.log());

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[daemon]\nstate_dir = \"relative\"\n").expect("bad config");
    let mut p = PluginProc::start(&bad, &dir, &[]);
    let st = p.wait_exit().await.expect("exits");
    assert_eq!(st.code(), Some(1));
    assert!(p.log().contains("bad.toml:2:"), "{}", p.log());
}

#[tokio::test]
async fn a_refused_registration_ends_the_plugin() {
    let tmp = TempDir::new("refuse");
    let dir = tmp.0.clone();
    let cfg = write_config(&dir);
    let (kubelet, mut regs) = start_kubelet_with(&dir, Some("invalid resource name"));
    let mut plugin = PluginProc::start(&cfg, &dir, &[]);
    next_register(&mut regs, &plugin).await;
    let st = plugin.wait_exit().await.expect("exits after the refusal");
    assert_eq!(st.code(), Some(1), "log:\n{}", plugin.log());
    let log = plugin.log();
    assert!(log.contains("invalid resource name"), "{log}");
    assert!(!dir.join("kfdmux.sock").exists(), "kfdmux.sock left behind");
    kubelet.abort();
}
