//! `weftctl inject`: adds the weft sidecar to Kubernetes workloads (Pod, Deployment,
//! StatefulSet, DaemonSet, ReplicaSet, Job, CronJob), as a native sidecar — an init container
//! with `restartPolicy: Always`, so it starts before the application and stops after it —
//! after the `weft init` init container that installs the nat rules with only `NET_ADMIN` and
//! `NET_RAW`. Other documents pass through unchanged; a workload already injected, or whose pod
//! template says `weft.io/inject: "false"`, too.

use serde_yaml_ng::{Mapping, Value};

/// The admin port the readiness probe reads `/ready` on (never redirected inbound).
pub const ADMIN_PORT: u16 = 15000;
const PROXY: &str = "weft-proxy";
const INIT: &str = "weft-init";

#[derive(Debug, Clone)]
pub struct InjectOptions {
    pub image: String,
    /// The control plane's URL(s), as `weft run --control-plane` takes them.
    pub control_plane: String,
    /// A Secret in the workload's namespace whose key `token` is a join token
    /// (`weftctl node add … --reusable`).
    pub join_secret: String,
    /// A ConfigMap in the workload's namespace whose key `bootstrap.yaml` is the sidecar's
    /// bootstrap (its admin listener; `deploy/kubernetes/sidecar-bootstrap.yaml`).
    pub bootstrap_configmap: String,
    pub proxy_uid: u32,
}

impl Default for InjectOptions {
    fn default() -> Self {
        InjectOptions {
            image: format!("weft:{}", env!("CARGO_PKG_VERSION")),
            control_plane: "https://weft-cp.weft-system.svc:18000".into(),
            join_secret: "weft-join".into(),
            bootstrap_configmap: "weft-sidecar-bootstrap".into(),
            proxy_uid: 1337,
        }
    }
}

fn key(k: &str) -> Value {
    Value::String(k.to_owned())
}

/// Adds the sidecar to every workload in `yaml` (documents separated by `---`).
pub fn inject(yaml: &str, opts: &InjectOptions) -> Result<String, String> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(yaml).enumerate() {
        let mut v = <Value as serde::Deserialize>::deserialize(doc)
            .map_err(|e| format!("document {}: {e}", i + 1))?;
        if v.is_null() {
            continue;
        }
        inject_document(&mut v, opts).map_err(|e| format!("document {}: {e}", i + 1))?;
        out.push(serde_yaml_ng::to_string(&v).map_err(|e| e.to_string())?);
    }
    Ok(out.join("---\n"))
}

fn inject_document(doc: &mut Value, opts: &InjectOptions) -> Result<(), String> {
    let Some(map) = doc.as_mapping_mut() else {
        return Err("not a mapping (a Kubernetes object)".into());
    };
    let kind = map
        .get("kind")
        .and_then(Value::as_str)
        .ok_or("no kind")?
        .to_owned();
    if kind == "List" {
        if let Some(items) = map.get_mut("items").and_then(Value::as_sequence_mut) {
            for item in items {
                inject_document(item, opts)?;
            }
        }
        return Ok(());
    }
    // Where the pod template (its metadata and spec) is.
    let path: &[&str] = match kind.as_str() {
        "Pod" => &[],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => &["spec", "template"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        _ => return Ok(()),
    };
    let mut template = &mut *map;
    for (depth, step) in path.iter().enumerate() {
        template = template
            .get_mut(*step)
            .and_then(Value::as_mapping_mut)
            .ok_or_else(|| format!("{kind}: no {}", path[..=depth].join(".")))?;
    }
    let annotations = template
        .get("metadata")
        .and_then(|m| m.get("annotations"))
        .and_then(Value::as_mapping);
    if annotations
        .and_then(|a| a.get("weft.io/inject"))
        .and_then(Value::as_str)
        == Some("false")
    {
        return Ok(());
    }
    if template
        .get("spec")
        .and_then(|s| s.get("hostNetwork"))
        .and_then(Value::as_bool)
        == Some(true)
    {
        return Err(format!(
            "{kind}: hostNetwork pods share the node's network namespace: weft init would capture the node's traffic (annotate weft.io/inject: \"false\")"
        ));
    }
    let spec = template
        .get_mut("spec")
        .and_then(Value::as_mapping_mut)
        .ok_or_else(|| format!("{kind}: the pod template has no spec"))?;
    let containers = spec
        .get("containers")
        .and_then(Value::as_sequence)
        .ok_or_else(|| format!("{kind}: the pod has no containers"))?;
    let named = |c: &Value, n: &str| c.get("name").and_then(Value::as_str) == Some(n);
    let inits = spec.get("initContainers").and_then(Value::as_sequence);
    if inits.is_some_and(|s| s.iter().any(|c| named(c, PROXY)))
        || containers.iter().any(|c| named(c, PROXY))
    {
        return Ok(()); // Already injected.
    }
    // The workload's TCP ports are redirected inbound; none declared: every port.
    let mut ports = Vec::new();
    for c in containers {
        for p in c
            .get("ports")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let tcp = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP") == "TCP";
            if let Some(n) = p.get("containerPort").and_then(Value::as_u64)
                && tcp
                && n != u64::from(ADMIN_PORT)
                && !ports.contains(&n)
            {
                ports.push(n);
            }
        }
    }
    for n in &ports {
        if *n == 15001 || *n == 15006 {
            return Err(format!(
                "{kind}: container port {n} is one of the sidecar's capture ports"
            ));
        }
    }
    let inbound = if ports.is_empty() {
        "*".to_owned()
    } else {
        ports
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };

    let mut added = vec![init_container(opts, &inbound), proxy_container(opts)];
    if let Some(existing) = spec.get("initContainers").and_then(Value::as_sequence) {
        added.extend(existing.iter().cloned());
    }
    spec.insert(key("initContainers"), Value::Sequence(added));
    let mut volumes = spec
        .get("volumes")
        .and_then(Value::as_sequence)
        .cloned()
        .unwrap_or_default();
    volumes.extend(volumes_for(opts));
    spec.insert(key("volumes"), Value::Sequence(volumes));

    let metadata = template
        .entry(key("metadata"))
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    let metadata = metadata
        .as_mapping_mut()
        .ok_or_else(|| format!("{kind}: metadata is not a mapping"))?;
    let annotations = metadata
        .entry(key("annotations"))
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if let Some(a) = annotations.as_mapping_mut() {
        a.insert(key("weft.io/injected"), key("true"));
    }
    Ok(())
}

fn yaml(text: &str) -> Value {
    serde_yaml_ng::from_str(text).expect("the sidecar's manifests are valid YAML")
}

fn init_container(opts: &InjectOptions, inbound: &str) -> Value {
    let uid = opts.proxy_uid;
    let mut v = yaml(&format!(
        r#"
name: {INIT}
args: [init, --proxy-uid, "{uid}", --inbound-ports, "{inbound}", --exclude-inbound-ports, "{ADMIN_PORT}"]
securityContext:
  runAsUser: 0
  runAsNonRoot: false
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: {{ add: [NET_ADMIN, NET_RAW], drop: [ALL] }}
resources:
  requests: {{ cpu: 10m, memory: 16Mi }}
  limits: {{ cpu: 100m, memory: 64Mi }}
"#
    ));
    set_image(&mut v, &opts.image);
    v
}

fn proxy_container(opts: &InjectOptions) -> Value {
    let uid = opts.proxy_uid;
    let mut v = yaml(&format!(
        r#"
name: {PROXY}
restartPolicy: Always
args:
  - run
  - --config
  - /etc/weft/bootstrap/bootstrap.yaml
  - --state-dir
  - /var/run/weft
  - --join-token-file
  - /etc/weft/join/token
ports:
  - {{ name: weft-admin, containerPort: {ADMIN_PORT}, protocol: TCP }}
readinessProbe:
  httpGet: {{ path: /ready, port: {ADMIN_PORT} }}
  periodSeconds: 2
  failureThreshold: 30
startupProbe:
  httpGet: {{ path: /ready, port: {ADMIN_PORT} }}
  periodSeconds: 1
  failureThreshold: 120
securityContext:
  runAsUser: {uid}
  runAsGroup: {uid}
  runAsNonRoot: true
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: {{ drop: [ALL] }}
resources:
  requests: {{ cpu: 100m, memory: 64Mi }}
  limits: {{ cpu: "2", memory: 256Mi }}
volumeMounts:
  - {{ name: weft-state, mountPath: /var/run/weft }}
  - {{ name: weft-join, mountPath: /etc/weft/join, readOnly: true }}
  - {{ name: weft-bootstrap, mountPath: /etc/weft/bootstrap, readOnly: true }}
"#
    ));
    set_image(&mut v, &opts.image);
    if let Some(args) = v.get_mut("args").and_then(Value::as_sequence_mut) {
        args.insert(1, key("--control-plane"));
        args.insert(2, key(&opts.control_plane));
    }
    v
}

fn set_image(v: &mut Value, image: &str) {
    if let Some(m) = v.as_mapping_mut() {
        m.insert(key("image"), key(image));
    }
}

fn volumes_for(opts: &InjectOptions) -> Vec<Value> {
    vec![
        yaml("{ name: weft-state, emptyDir: { medium: Memory } }"),
        // 292 = 0o444: the files are root's; only the sidecar container mounts the volume.
        yaml(&format!(
            "{{ name: weft-join, secret: {{ secretName: {}, defaultMode: 292 }} }}",
            opts.join_secret
        )),
        yaml(&format!(
            "{{ name: weft-bootstrap, configMap: {{ name: {} }} }}",
            opts.bootstrap_configmap
        )),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: { name: web }
spec:
  selector: { matchLabels: { app: web } }
  template:
    metadata: { labels: { app: web } }
    spec:
      initContainers: [ { name: migrate, image: web } ]
      containers:
        - name: web
          image: web
          ports: [ { containerPort: 8080 }, { containerPort: 9090, protocol: TCP }, { containerPort: 53, protocol: UDP } ]
---
apiVersion: v1
kind: Service
metadata: { name: web }
spec: { ports: [ { port: 80 } ] }
"#;

    fn parsed(text: &str) -> Vec<Value> {
        serde_yaml_ng::Deserializer::from_str(text)
            .map(|d| <Value as serde::Deserialize>::deserialize(d).expect("yaml"))
            .collect()
    }

    #[test]
    fn a_deployment_gets_the_native_sidecar_after_weft_init() {
        let out = inject(DEPLOYMENT, &InjectOptions::default()).expect("inject");
        let docs = parsed(&out);
        assert_eq!(docs.len(), 2);
        let spec = &docs[0]["spec"]["template"]["spec"];
        let inits = spec["initContainers"].as_sequence().expect("inits");
        let names: Vec<&str> = inits.iter().filter_map(|c| c["name"].as_str()).collect();
        assert_eq!(names, ["weft-init", "weft-proxy", "migrate"]);
        assert_eq!(inits[1]["restartPolicy"].as_str(), Some("Always"));
        assert_eq!(
            inits[1]["securityContext"]["runAsUser"].as_u64(),
            Some(1337)
        );
        let args: Vec<&str> = inits[0]["args"]
            .as_sequence()
            .expect("args")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            args.windows(2)
                .any(|w| w == ["--inbound-ports", "8080,9090"]),
            "{args:?}"
        );
        let caps = &inits[0]["securityContext"]["capabilities"];
        assert_eq!(caps["add"].as_sequence().map(Vec::len), Some(2));
        assert_eq!(
            docs[0]["spec"]["template"]["metadata"]["annotations"]["weft.io/injected"].as_str(),
            Some("true")
        );
        // The Service passes through unchanged.
        assert_eq!(docs[1], parsed(DEPLOYMENT)[1]);
        // Injecting twice changes nothing more.
        assert_eq!(inject(&out, &InjectOptions::default()).expect("again"), out);
    }

    #[test]
    fn pods_cronjobs_opt_outs_and_bad_documents() {
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: { name: p }\nspec: { containers: [ { name: a, image: a } ] }\n";
        let out = parsed(&inject(pod, &InjectOptions::default()).expect("pod"));
        let args = &out[0]["spec"]["initContainers"][0]["args"];
        assert!(
            args.as_sequence().expect("args").contains(&key("*")),
            "no ports: every port"
        );
        let cron = "apiVersion: batch/v1\nkind: CronJob\nmetadata: { name: c }\nspec: { schedule: '* * * * *', jobTemplate: { spec: { template: { spec: { restartPolicy: Never, containers: [ { name: a, image: a } ] } } } } }\n";
        let out = parsed(&inject(cron, &InjectOptions::default()).expect("cron"));
        assert!(
            out[0]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["initContainers"]
                .is_sequence()
        );
        let opted_out = "apiVersion: v1\nkind: Pod\nmetadata: { name: p, annotations: { weft.io/inject: \"false\" } }\nspec: { containers: [ { name: a, image: a } ] }\n";
        assert_eq!(
            parsed(&inject(opted_out, &InjectOptions::default()).expect("opt-out")),
            parsed(opted_out)
        );
        for (bad, want) in [
            ("- a\n- b\n", "not a mapping"),
            ("kind: Deployment\nspec: {}\n", "no spec.template"),
            ("kind: Pod\nspec: {}\n", "no containers"),
            (
                "kind: Pod\nspec: { hostNetwork: true, containers: [ { name: a } ] }\n",
                "hostNetwork",
            ),
            (
                "kind: Pod\nspec: { containers: [ { name: a, ports: [ { containerPort: 15001 } ] } ] }\n",
                "capture ports",
            ),
            ("kind: Pod\nspec: [\n", "document 1"),
            ("apiVersion: v1\n", "no kind"),
        ] {
            let e = inject(bad, &InjectOptions::default()).expect_err(want);
            assert!(e.contains(want), "{want}: {e}");
        }
    }
}
