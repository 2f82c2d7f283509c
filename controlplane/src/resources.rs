//! Resources: what users apply. Each is one item of weft's configuration (a listener, a route
//! table, a cluster, a filter, a service) with the labels of the proxies it is for.
//!
//! ```yaml
//! kind: cluster
//! selector: { app: reviews }        # optional: every proxy when absent
//! spec: { name: ratings, endpoints: ["10.0.0.7:9080"] }
//! ---
//! kind: routes
//! spec: { name: main, routes: [ { to: [ { cluster: ratings } ] } ] }
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use weft_proxy::config::{Cluster, Config, Filter, Listener, MeshService, Route, Service, Sidecar};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Listener,
    Routes,
    Cluster,
    Filter,
    Service,
    /// A service of the mesh's registry (sidecars route by it).
    MeshService,
    /// The sidecar settings of the proxies it selects (their workload's ports, mode, egress).
    Sidecar,
}

impl Kind {
    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "listener" | "listeners" => Kind::Listener,
            "routes" | "route" | "route_table" => Kind::Routes,
            "cluster" | "clusters" => Kind::Cluster,
            "filter" | "filters" => Kind::Filter,
            "service" | "services" => Kind::Service,
            "mesh_service" | "mesh_services" => Kind::MeshService,
            "sidecar" | "sidecars" => Kind::Sidecar,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Listener => "listener",
            Kind::Routes => "routes",
            Kind::Cluster => "cluster",
            Kind::Filter => "filter",
            Kind::Service => "service",
            Kind::MeshService => "mesh_service",
            Kind::Sidecar => "sidecar",
        }
    }
}

/// A route table as a resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTable {
    pub name: String,
    pub routes: Vec<Route>,
}

/// The spec of a resource, typed by its kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    Listener(Listener),
    Routes(RouteTable),
    Cluster(Cluster),
    Filter(Filter),
    Service(Service),
    MeshService(MeshService),
    Sidecar(Sidecar),
}

impl Spec {
    pub fn kind(&self) -> Kind {
        match self {
            Spec::Listener(_) => Kind::Listener,
            Spec::Routes(_) => Kind::Routes,
            Spec::Cluster(_) => Kind::Cluster,
            Spec::Filter(_) => Kind::Filter,
            Spec::Service(_) => Kind::Service,
            Spec::MeshService(_) => Kind::MeshService,
            Spec::Sidecar(_) => Kind::Sidecar,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Spec::Listener(l) => &l.name,
            Spec::Routes(r) => &r.name,
            Spec::Cluster(c) => &c.name,
            Spec::Filter(f) => &f.name,
            Spec::Service(s) => &s.name,
            Spec::MeshService(s) => &s.name,
            Spec::Sidecar(s) => &s.name,
        }
    }

    fn to_json(&self) -> serde_json::Value {
        let v = match self {
            Spec::Listener(x) => serde_json::to_value(x),
            Spec::Routes(x) => serde_json::to_value(x),
            Spec::Cluster(x) => serde_json::to_value(x),
            Spec::Filter(x) => serde_json::to_value(x),
            Spec::Service(x) => serde_json::to_value(x),
            Spec::MeshService(x) => serde_json::to_value(x),
            Spec::Sidecar(x) => serde_json::to_value(x),
        };
        v.unwrap_or(serde_json::Value::Null)
    }

    fn from_json(kind: Kind, v: serde_json::Value) -> Result<Spec, String> {
        let e = |e: serde_json::Error| e.to_string();
        Ok(match kind {
            Kind::Listener => Spec::Listener(serde_json::from_value(v).map_err(e)?),
            Kind::Routes => Spec::Routes(serde_json::from_value(v).map_err(e)?),
            Kind::Cluster => Spec::Cluster(serde_json::from_value(v).map_err(e)?),
            Kind::Filter => Spec::Filter(serde_json::from_value(v).map_err(e)?),
            Kind::Service => Spec::Service(serde_json::from_value(v).map_err(e)?),
            Kind::MeshService => Spec::MeshService(serde_json::from_value(v).map_err(e)?),
            Kind::Sidecar => Spec::Sidecar(serde_json::from_value(v).map_err(e)?),
        })
    }
}

/// One resource: its spec and the proxies it selects.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub selector: BTreeMap<String, String>,
    pub spec: Spec,
}

/// The document form of a resource (what users write and `get` prints).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    kind: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    selector: BTreeMap<String, String>,
    spec: serde_json::Value,
}

impl Resource {
    /// Whether a proxy with `labels` gets it.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    pub fn key(&self) -> (Kind, String) {
        (self.spec.kind(), self.spec.name().to_owned())
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "kind": self.spec.kind().as_str(),
            "selector": self.selector,
            "spec": self.spec.to_json(),
        })
    }

    pub fn from_json(v: serde_json::Value) -> Result<Resource, String> {
        let d: Document = serde_json::from_value(v).map_err(|e| e.to_string())?;
        Self::from_document(d)
    }

    fn from_document(d: Document) -> Result<Resource, String> {
        let kind = Kind::parse(&d.kind).ok_or_else(|| {
            format!(
                "kind: unknown kind {:?} (listener, routes, cluster, filter, service, mesh_service, sidecar)",
                d.kind
            )
        })?;
        let spec = Spec::from_json(kind, d.spec).map_err(|e| format!("spec: {e}"))?;
        if spec.name().is_empty() {
            return Err("spec.name: must not be empty".into());
        }
        for (k, v) in &d.selector {
            if k.is_empty() || v.is_empty() {
                return Err(format!("selector: empty label in {k:?}={v:?}"));
            }
        }
        Ok(Resource {
            selector: d.selector,
            spec,
        })
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(&self.to_json()).unwrap_or_default()
    }
}

/// Parses YAML documents (`---` separated); every error, located by document.
///
/// A kind and name identify one resource: two documents naming the same one (two listeners
/// called `edge` with different selectors, say) are refused with both documents' places —
/// keeping the last would drop the other silently.
pub fn parse_documents(text: &str) -> Result<Vec<Resource>, Vec<String>> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    let mut seen: std::collections::HashMap<(Kind, String), usize> = Default::default();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = match serde_yaml_ng::Value::deserialize(doc) {
            Ok(serde_yaml_ng::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                errors.push(format!("document {}: {e}", i + 1));
                continue;
            }
        };
        let parsed = serde_json::to_value(&value)
            .map_err(|e| e.to_string())
            .and_then(|json| serde_json::from_value::<Document>(json).map_err(|e| e.to_string()))
            .and_then(Resource::from_document);
        match parsed {
            Ok(r) => {
                let (kind, name) = r.key();
                match seen.get(&(kind, name.clone())) {
                    Some(first) => errors.push(format!(
                        "document {}: {}/{name} is also defined by document {first}: a kind \
                         and name identify one resource (merge them, or name them apart)",
                        i + 1,
                        kind.as_str()
                    )),
                    None => {
                        seen.insert((kind, name), i + 1);
                        out.push(r);
                    }
                }
            }
            Err(e) => errors.push(format!("document {}: {e}", i + 1)),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// The sidecar resources that select proxies with `labels` (more than one is an error).
pub fn sidecars<'a>(
    resources: impl IntoIterator<Item = &'a Resource>,
    labels: &BTreeMap<String, String>,
) -> Vec<&'a str> {
    resources
        .into_iter()
        .filter(|r| r.selects(labels))
        .filter_map(|r| match &r.spec {
            Spec::Sidecar(s) => Some(s.name.as_str()),
            _ => None,
        })
        .collect()
}

/// The configuration a proxy with `labels` serves: every resource that selects it.
pub fn assemble<'a>(
    resources: impl IntoIterator<Item = &'a Resource>,
    labels: &BTreeMap<String, String>,
) -> Config {
    let mut config = Config::default();
    for r in resources.into_iter().filter(|r| r.selects(labels)) {
        match &r.spec {
            Spec::Listener(l) => config.listeners.push(l.clone()),
            Spec::Routes(t) => {
                config.routes.insert(t.name.clone(), t.routes.clone());
            }
            Spec::Cluster(c) => config.clusters.push(c.clone()),
            Spec::Filter(f) => config.filters.push(f.clone()),
            Spec::Service(s) => config.services.push(s.clone()),
            Spec::MeshService(s) => config.mesh_services.push(s.clone()),
            // Validation refuses two sidecars for one proxy.
            Spec::Sidecar(s) => config.sidecar = Some(s.clone()),
        }
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCS: &str = r#"
kind: cluster
selector: { app: reviews }
spec: { name: ratings, endpoints: ["127.0.0.1:9080"] }
---
kind: routes
spec: { name: main, routes: [ { to: [ { cluster: ratings } ] } ] }
---
kind: listener
spec: { name: main, address: "127.0.0.1:0", routes: main }
"#;

    #[test]
    fn documents_parse_and_select_by_label() {
        let rs = parse_documents(DOCS).expect("valid");
        assert_eq!(rs.len(), 3);
        let reviews = BTreeMap::from([("app".to_owned(), "reviews".to_owned())]);
        let other = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
        let c = assemble(&rs, &reviews);
        assert_eq!((c.clusters.len(), c.listeners.len()), (1, 1));
        assert!(c.routes.contains_key("main"));
        assert_eq!(assemble(&rs, &other).clusters.len(), 0);
        // Round trip through the stored form.
        let back = Resource::from_json(rs[0].to_json()).expect("round trip");
        assert_eq!(back, rs[0]);
    }

    #[test]
    fn bad_documents_say_where() {
        let e = parse_documents("kind: nope\nspec: {}\n---\nkind: cluster\nspec: { name: x, endpoints: [], bogus: 1 }\n")
            .expect_err("invalid");
        assert_eq!(e.len(), 2);
        assert!(e[0].starts_with("document 1: kind: unknown kind"), "{e:?}");
        assert!(
            e[1].starts_with("document 2: spec: unknown field `bogus`"),
            "{e:?}"
        );
    }
}
