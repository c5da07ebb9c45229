//! Docker's volume plugin protocol (VolumeDriver, v1) on `/run/docker/plugins/volfs.sock`.
//!
//! Docker POSTs JSON to `/Plugin.Activate` and `/VolumeDriver.*`. Mount and Unmount are
//! reference counted per caller ID in the index (`holders` column family), so counts survive a
//! restart and repeated calls are idempotent. Every endpoint answers within [`DEADLINE`]; a
//! failure is `{"Err": "..."}` naming the volume and the reason.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use volfs::api::rfc3339;
use volfs::ids::VolumeName;
use volfs::volume::CreateOptions;
use volfs::Error;

use crate::control::{volume_info, Daemon};

/// Docker blocks while a plugin hangs; never take longer than this.
const DEADLINE: Duration = Duration::from_secs(20);
const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1+json";

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct Req {
    #[serde(default)]
    name: String,
    #[serde(default)]
    opts: Option<BTreeMap<String, String>>,
    #[serde(rename = "ID", default)]
    id: String,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct VolumeEntry {
    name: String,
    mountpoint: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    created_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<Value>,
}

type Handler = fn(&Daemon, Req) -> volfs::Result<Value>;

pub fn router(d: Arc<Daemon>) -> Router {
    let ops: [(&'static str, Handler); 7] = [
        ("Create", create),
        ("Remove", remove),
        ("Mount", mount),
        ("Unmount", unmount),
        ("Path", path),
        ("Get", get),
        ("List", list),
    ];
    let mut r = Router::new()
        .route("/Plugin.Activate", post(activate))
        .route("/VolumeDriver.Capabilities", post(capabilities));
    for (name, f) in ops {
        r = r.route(
            &format!("/VolumeDriver.{name}"),
            post(move |s, b| call(s, b, name, f)),
        );
    }
    r.with_state(d)
}

fn reply(status: StatusCode, v: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        v.to_string(),
    )
        .into_response()
}

async fn activate() -> Response {
    reply(StatusCode::OK, json!({"Implements": ["VolumeDriver"]}))
}

async fn capabilities() -> Response {
    reply(StatusCode::OK, json!({"Capabilities": {"Scope": "local"}}))
}

/// Parses the request, runs `f` on the blocking pool within the deadline, and turns errors
/// into `{"Err": ...}`.
async fn call(State(d): State<Arc<Daemon>>, body: Bytes, op: &'static str, f: Handler) -> Response {
    let op = format!("docker VolumeDriver.{op}");
    let req: Req = if body.iter().all(|b| b.is_ascii_whitespace()) {
        Req::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(op, "malformed request: {e}");
                return reply(
                    StatusCode::BAD_REQUEST,
                    json!({"Err": format!("malformed request: {e}")}),
                );
            }
        }
    };
    let volume = if req.name.is_empty() {
        "-".to_string()
    } else {
        req.name.clone()
    };
    let work = tokio::task::spawn_blocking(move || f(&d, req));
    match tokio::time::timeout(DEADLINE, work).await {
        Ok(Ok(Ok(v))) => reply(StatusCode::OK, v),
        Ok(Ok(Err(e))) => {
            // Docker asks Get for names it does not know before every Create: not a warning.
            if matches!(e, Error::NotFound(_)) {
                tracing::debug!(volume, op, "{e}");
            } else {
                tracing::warn!(volume, op, "{e}");
            }
            reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"Err": e.to_string()}),
            )
        }
        Ok(Err(e)) => {
            tracing::error!(volume, op, "internal error: {e}");
            reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"Err": format!("internal error: {e}")}),
            )
        }
        Err(_) => {
            tracing::error!(volume, op, "request took longer than {DEADLINE:?}");
            reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"Err": format!("volfs did not answer within {DEADLINE:?}")}),
            )
        }
    }
}

/// Splits Docker `--opt`s into volume options and labels. Known keys: `size`, `ro`, `from`;
/// labels are `label.KEY=V` or reverse-DNS keys containing a dot (`com.example.team=db`).
pub fn parse_opts(opts: &BTreeMap<String, String>) -> volfs::Result<CreateOptions> {
    let mut o = CreateOptions::default();
    let mut unknown = Vec::new();
    for (k, v) in opts {
        match k.as_str() {
            "size" | "ro" | "readonly" | "from" => o.set_opt(k, v)?,
            _ if k.starts_with("label.") && k.len() > 6 => {
                o.labels.insert(k[6..].to_string(), v.clone());
            }
            _ if k.contains('.') => {
                o.labels.insert(k.clone(), v.clone());
            }
            _ => unknown.push(k.clone()),
        }
    }
    if !unknown.is_empty() {
        return Err(Error::Invalid(format!(
            "unknown volume option(s): {} (volfs takes size, ro, from, and labels as label.KEY=V or reverse-DNS keys)",
            unknown.join(", ")
        )));
    }
    Ok(o)
}

fn name(req: &Req) -> volfs::Result<VolumeName> {
    VolumeName::new(&req.name)
}

fn create(d: &Daemon, req: Req) -> volfs::Result<Value> {
    let n = name(&req)?;
    let opts = parse_opts(&req.opts.unwrap_or_default())?;
    if d.mounts.registry().get(&n)?.is_some() {
        // Docker may ask again for a volume it already knows.
        return Ok(json!({"Err": ""}));
    }
    crate::control::with_claim(d, &n, 0, || d.mounts.create_volume(&n, &opts))?;
    Ok(json!({"Err": ""}))
}

fn remove(d: &Daemon, req: Req) -> volfs::Result<Value> {
    let n = name(&req)?;
    let held = d.mounts.holders(n.as_str())?;
    if held > 0 {
        return Err(Error::Busy(format!(
            "volume {n} (in use by {held} container mount(s))"
        )));
    }
    crate::control::remove_volume(d, n.as_str(), false)?;
    Ok(json!({"Err": ""}))
}

fn mount(d: &Daemon, req: Req) -> volfs::Result<Value> {
    let n = name(&req)?;
    if req.id.is_empty() {
        return Err(Error::Invalid("Mount without an ID".into()));
    }
    let p = d.mounts.hold(&n, &req.id)?;
    Ok(json!({"Mountpoint": p.display().to_string(), "Err": ""}))
}

fn unmount(d: &Daemon, req: Req) -> volfs::Result<Value> {
    let n = name(&req)?;
    d.mounts.registry().require(&n)?;
    d.mounts.unhold(&n, &req.id)?;
    Ok(json!({"Err": ""}))
}

fn mountpoint(d: &Daemon, vol: &str) -> volfs::Result<String> {
    Ok(d.mounts
        .held_path(vol)?
        .map(|p| p.display().to_string())
        .unwrap_or_default())
}

fn path(d: &Daemon, req: Req) -> volfs::Result<Value> {
    let n = name(&req)?;
    d.mounts.registry().require(&n)?;
    Ok(json!({"Mountpoint": mountpoint(d, n.as_str())?, "Err": ""}))
}

fn get(d: &Daemon, req: Req) -> volfs::Result<Value> {
    let n = name(&req)?;
    let rec = d.mounts.registry().require(&n)?;
    let info = volume_info(d, &rec)?;
    let status = json!({
        "bytes_used": info.bytes_used,
        "size": info.size,
        "read_only": info.read_only,
        "labels": info.labels,
        "snapshots": info.snapshots,
        "mountpoints": info.mountpoints,
        "docker_references": d.mounts.holders(n.as_str())?,
    });
    let v = VolumeEntry {
        name: rec.name.clone(),
        mountpoint: mountpoint(d, &rec.name)?,
        created_at: Some(rfc3339(rec.created)),
        status: Some(status),
    };
    Ok(json!({"Volume": v, "Err": ""}))
}

fn list(d: &Daemon, _req: Req) -> volfs::Result<Value> {
    let mut out = Vec::new();
    for rec in d.mounts.registry().list()? {
        out.push(VolumeEntry {
            mountpoint: mountpoint(d, &rec.name)?,
            name: rec.name,
            created_at: None,
            status: None,
        });
    }
    Ok(json!({"Volumes": out, "Err": ""}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_and_labels() {
        let mut m = BTreeMap::new();
        m.insert("size".to_string(), "1G".to_string());
        m.insert("label.team".to_string(), "db".to_string());
        m.insert("com.example.tier".to_string(), "gold".to_string());
        let o = parse_opts(&m).unwrap();
        assert_eq!(o.size, Some(1 << 30));
        assert_eq!(o.labels.get("team").map(String::as_str), Some("db"));
        assert_eq!(
            o.labels.get("com.example.tier").map(String::as_str),
            Some("gold")
        );
        m.insert("colour".to_string(), "red".to_string());
        m.insert("speed".to_string(), "fast".to_string());
        let e = parse_opts(&m).unwrap_err().to_string();
        assert!(e.contains("colour") && e.contains("speed"), "{e}");
    }
}
