//! The dashboard in a real headless browser (Chromium from the system's
//! packages; the test script installs it): the page, loaded against a
//! running server with a campaign in progress, shows the numbers the API
//! reports and draws the chart; a screenshot is saved as a test artifact
//! (`target/test-artifacts/dashboard.png`).
//!
//! Skips with a printed reason when no Chromium is installed.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use smartmsg_service::http::{serve_on, SenderConfig, ServeConfig};

fn chromium() -> Option<String> {
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Some(c.to_owned());
        }
    }
    eprintln!("skipping: no chromium installed (scripts/test installs Debian's `chromium`)");
    None
}

fn browser(
    bin: &str,
    profile: &std::path::Path,
    extra: &[&str],
    url: &str,
) -> std::process::Output {
    Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--virtual-time-budget=6000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .unwrap()
}

/// The `data-field` values of the campaign's box in a dumped DOM.
fn field(dom: &str, name: &str) -> Option<String> {
    let at = dom.find(&format!("data-field=\"{name}\""))?;
    let rest = &dom[at..];
    let start = rest.find('>')? + 1;
    let end = rest[start..].find('<')? + start;
    Some(rest[start..end].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_what_the_api_reports() {
    let Some(bin) = chromium() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = {
        let mut built = ServeConfig::default();
        built.data_dir = dir.path().join("data");
        built.sender = SenderConfig::Outbox {
            dir: dir.path().join("outbox"),
        };
        built.poll_interval_ms = 20;
        built
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        serve_on(config, listener, async move {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    let client = reqwest::Client::new();
    let post = |path: &str, ct: &str, body: Vec<u8>| {
        client
            .post(format!("{url}{path}"))
            .header("content-type", ct)
            .body(body)
            .send()
    };
    let def = json!({
        "id": "autumn", "channel": "test", "creatives": ["red", "blue", "green"],
        "budget": 300, "batches": 3, "interval_ms": 600_000, "features": ["a", "b"],
        "pipeline": {"window_ms": 200, "grace_ms": 100}
    });
    assert!(post(
        "/v1/campaigns",
        "application/json",
        def.to_string().into_bytes()
    )
    .await
    .unwrap()
    .status()
    .is_success());
    let mut csv = String::from("user,a,b\n");
    for u in 0..900 {
        csv.push_str(&format!(
            "{u},{},{}\n",
            (u % 9) as f32 / 9.0,
            (u % 4) as f32 / 4.0
        ));
    }
    let r = client
        .put(format!("{url}/v1/campaigns/autumn/audience"))
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    assert!(
        post("/v1/campaigns/autumn/start", "application/json", Vec::new())
            .await
            .unwrap()
            .status()
            .is_success()
    );
    let get = || async {
        client
            .get(format!("{url}/v1/campaigns/autumn"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .map(|b| serde_json::from_slice::<Value>(&b).unwrap())
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while get().await["live"]["sent"] != 100 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Some users react.
    let outbox = std::fs::read_to_string(dir.path().join("outbox/autumn/batch-0.jsonl")).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let body: String = outbox
        .lines()
        .step_by(3)
        .map(|l| {
            format!(
                "{},\"reaction\":\"clicked\",\"time_ms\":{now}}}\n",
                l.trim_end_matches('}')
            )
        })
        .collect();
    assert!(
        post("/v1/reactions", "application/x-ndjson", body.into_bytes())
            .await
            .unwrap()
            .status()
            .is_success()
    );
    let v = loop {
        let v = get().await;
        if v["live"]["reactions"].as_u64() == Some(34) {
            break v;
        }
        assert!(Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The page, in the browser.
    let profile = tempfile::tempdir().unwrap();
    let out = browser(
        &bin,
        profile.path(),
        &["--dump-dom"],
        &format!("{url}/dashboard"),
    );
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        dom.contains("data-loaded=\"true\""),
        "the page did not load its data: {}\n{dom}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(field(&dom, "state").as_deref(), Some("running"), "{dom}");
    assert_eq!(field(&dom, "sent"), Some(v["live"]["sent"].to_string()));
    assert_eq!(
        field(&dom, "reactions"),
        Some(v["live"]["reactions"].to_string())
    );
    assert_eq!(
        field(&dom, "budget_left"),
        Some(v["live"]["budget_left"].to_string())
    );
    let per: Vec<u64> = v["live"]["batches"][0]["reacted_per_creative"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    let cumulative = format!(
        "data-cumulative=\"{}\"",
        serde_json::to_string(&per).unwrap().replace('"', "&quot;")
    );
    assert!(dom.contains(&cumulative), "{cumulative} not in the page");
    assert!(dom.contains("<canvas"), "the chart was not drawn");
    // A screenshot, kept as an artifact.
    let artifacts =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let png = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&png);
    let profile = tempfile::tempdir().unwrap();
    let out = browser(
        &bin,
        profile.path(),
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1100,900",
        ],
        &format!("{url}/dashboard"),
    );
    let size = std::fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "screenshot of {size} bytes: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = stop.send(());
    server.await.unwrap();
}
