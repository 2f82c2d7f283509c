//! Incremental snapshots: what changed between two configurations, and the configuration built
//! back from the one a proxy holds and those changes.
//!
//! A configuration travels as canonical JSON (object keys sorted, no spaces): both sides then
//! produce the same bytes for the same configuration, and the digest of the bytes the proxy
//! builds is checked against the one weft-cp computed. A top-level key is a section; a section
//! that is a list of objects with unique `name`s changes item by item (with the names' order
//! after the change); any other section changes whole.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;
use weft_wire::v1;

/// The canonical JSON of `value` (sorted keys: serde_json's maps are ordered).
pub fn canonical<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_value(value)
        .and_then(|v| serde_json::to_vec(&v))
        .unwrap_or_default()
}

/// A section's items by name, if it is a list of objects with unique string `name`s.
fn named(v: &Value) -> Option<(Vec<String>, BTreeMap<String, &Value>)> {
    let list = v.as_array()?;
    let mut order = Vec::with_capacity(list.len());
    let mut items = BTreeMap::new();
    for item in list {
        let name = item.as_object()?.get("name")?.as_str()?.to_owned();
        if items.insert(name.clone(), item).is_some() {
            return None;
        }
        order.push(name);
    }
    Some((order, items))
}

fn json(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// What changed from `old` to `new` (both canonical configuration JSON), or `None` when either
/// is not a JSON object.
pub fn diff(old: &[u8], new: &[u8]) -> Option<(Vec<v1::ConfigChange>, Vec<v1::SectionOrder>)> {
    let old: Value = serde_json::from_slice(old).ok()?;
    let new: Value = serde_json::from_slice(new).ok()?;
    let (old, new) = (old.as_object()?, new.as_object()?);
    let mut changes = Vec::new();
    let mut orders = Vec::new();
    let sections: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for section in sections {
        let (was, now) = (old.get(section), new.get(section));
        if was == now {
            continue;
        }
        let whole = |json: Vec<u8>| v1::ConfigChange {
            section: section.clone(),
            name: String::new(),
            json,
        };
        let Some(now) = now else {
            changes.push(whole(Vec::new()));
            continue;
        };
        match (was.and_then(named), named(now)) {
            (Some((_, before)), Some((order, after))) => {
                for (name, item) in &after {
                    if before.get(name) != Some(item) {
                        changes.push(v1::ConfigChange {
                            section: section.clone(),
                            name: name.clone(),
                            json: json(item),
                        });
                    }
                }
                for name in before.keys().filter(|n| !after.contains_key(*n)) {
                    changes.push(v1::ConfigChange {
                        section: section.clone(),
                        name: name.clone(),
                        json: Vec::new(),
                    });
                }
                orders.push(v1::SectionOrder {
                    section: section.clone(),
                    names: order,
                });
            }
            _ => changes.push(whole(json(now))),
        }
    }
    Some((changes, orders))
}

/// The bytes of a delta on the wire (to weigh it against the whole configuration).
pub fn size(changes: &[v1::ConfigChange], orders: &[v1::SectionOrder]) -> usize {
    changes
        .iter()
        .map(|c| c.section.len() + c.name.len() + c.json.len() + 8)
        .chain(
            orders
                .iter()
                .map(|o| o.section.len() + o.names.iter().map(|n| n.len() + 2).sum::<usize>()),
        )
        .sum()
}

/// The configuration `base` (canonical JSON) becomes with `changes` and `orders`, checked
/// against `digest`. Every error starts with "delta:" (the proxy NACKs with it and is sent the
/// whole configuration).
pub fn rebuild(
    base: &[u8],
    changes: &[v1::ConfigChange],
    orders: &[v1::SectionOrder],
    digest: &str,
) -> Result<Vec<u8>, String> {
    let bad = |why: String| format!("delta: {why}");
    let mut root: Value =
        serde_json::from_slice(base).map_err(|e| bad(format!("the held configuration: {e}")))?;
    let object = root
        .as_object_mut()
        .ok_or_else(|| bad("the held configuration is not an object".into()))?;
    let mut items: BTreeMap<&str, Vec<&v1::ConfigChange>> = BTreeMap::new();
    for c in changes {
        if c.name.is_empty() {
            if c.json.is_empty() {
                object.remove(&c.section);
            } else {
                let v = serde_json::from_slice(&c.json)
                    .map_err(|e| bad(format!("section {}: {e}", c.section)))?;
                object.insert(c.section.clone(), v);
            }
        } else {
            items.entry(c.section.as_str()).or_default().push(c);
        }
    }
    for o in orders {
        let current = object.get(&o.section).unwrap_or(&Value::Null);
        let mut by_name: BTreeMap<String, Value> = match current {
            Value::Null => BTreeMap::new(),
            v => named(v)
                .ok_or_else(|| {
                    bad(format!(
                        "section {} is not a list of named items",
                        o.section
                    ))
                })?
                .1
                .into_iter()
                .map(|(k, v)| (k, v.clone()))
                .collect(),
        };
        for c in items.remove(o.section.as_str()).unwrap_or_default() {
            if c.json.is_empty() {
                by_name.remove(&c.name);
            } else {
                let v = serde_json::from_slice(&c.json)
                    .map_err(|e| bad(format!("{}/{}: {e}", c.section, c.name)))?;
                by_name.insert(c.name.clone(), v);
            }
        }
        let mut list = Vec::with_capacity(o.names.len());
        for name in &o.names {
            list.push(by_name.remove(name).ok_or_else(|| {
                bad(format!("{}/{name} is in the order but not held", o.section))
            })?);
        }
        if let Some(extra) = by_name.keys().next() {
            return Err(bad(format!(
                "{}/{extra} is held but not in the order",
                o.section
            )));
        }
        object.insert(o.section.clone(), Value::Array(list));
    }
    if let Some(section) = items.keys().next() {
        return Err(bad(format!("section {section} changed without its order")));
    }
    let bytes = serde_json::to_vec(&root).map_err(|e| bad(e.to_string()))?;
    if super::config_digest(&bytes) != digest {
        return Err(bad(
            "the configuration built does not match its digest".into()
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bytes(v: Value) -> Vec<u8> {
        canonical(&v)
    }

    fn roundtrip(old: Value, new: Value) -> usize {
        let (o, n) = (bytes(old), bytes(new));
        let (changes, orders) = diff(&o, &n).expect("objects");
        let built =
            rebuild(&o, &changes, &orders, &super::super::config_digest(&n)).expect("rebuilds");
        assert_eq!(built, n);
        size(&changes, &orders)
    }

    #[test]
    fn changes_rebuild_the_new_configuration_exactly() {
        let cluster = |name: &str, ep: &str| json!({"name": name, "endpoints": [ep]});
        let old = json!({
            "clusters": [cluster("a", "1"), cluster("b", "1"), cluster("c", "1")],
            "listeners": [{"name": "main", "address": "127.0.0.1:80"}],
            "workers": 2,
            "gone": {"x": 1},
        });
        let new = json!({
            "clusters": [cluster("d", "1"), cluster("a", "2"), cluster("c", "1")],
            "listeners": [{"name": "main", "address": "127.0.0.1:80"}],
            "workers": 3,
            "services": [{"name": "s"}],
        });
        roundtrip(old.clone(), new.clone());
        roundtrip(new.clone(), old.clone());
        roundtrip(old.clone(), old.clone());
        roundtrip(json!({}), new.clone());
        // A list that is not of unique named items changes whole.
        roundtrip(
            json!({"l": [{"name": "x"}, {"name": "x"}]}),
            json!({"l": [{"name": "x"}]}),
        );
        roundtrip(json!({"l": [1, 2]}), json!({"l": [{"name": "x"}]}));
        // One changed item of many costs about that item.
        let many = |v: &str| json!({"clusters": (0..500).map(|i| cluster(&format!("c{i}"), if i == 7 { v } else { "x" })).collect::<Vec<_>>()});
        let small = roundtrip(many("1"), many("2"));
        assert!(small < bytes(many("2")).len() / 5, "{small}");
    }

    #[test]
    fn a_wrong_base_or_hostile_delta_is_refused_with_a_delta_reason() {
        let old = bytes(json!({"clusters": [{"name": "a"}], "x": 1}));
        let new = bytes(json!({"clusters": [{"name": "a", "v": 2}], "x": 1}));
        let (changes, orders) = diff(&old, &new).expect("diff");
        let digest = super::super::config_digest(&new);
        // Another base.
        let other = bytes(json!({"clusters": [{"name": "b"}], "x": 1}));
        let e = rebuild(&other, &changes, &orders, &digest).expect_err("wrong base");
        assert!(e.starts_with("delta:"), "{e}");
        // A digest that does not match.
        let e = rebuild(&old, &changes, &orders, "00").expect_err("digest");
        assert!(e.starts_with("delta:"), "{e}");
        // Item changes without an order; an order naming what is not there; bad JSON.
        for (c, o) in [
            (changes.clone(), vec![]),
            (
                changes.clone(),
                vec![v1::SectionOrder {
                    section: "clusters".into(),
                    names: vec!["a".into(), "ghost".into()],
                }],
            ),
            (
                vec![v1::ConfigChange {
                    section: "clusters".into(),
                    name: "a".into(),
                    json: b"{not json".to_vec(),
                }],
                orders.clone(),
            ),
            (
                vec![v1::ConfigChange {
                    section: "x".into(),
                    name: String::new(),
                    json: b"[".to_vec(),
                }],
                vec![],
            ),
        ] {
            let e = rebuild(&old, &c, &o, &digest).expect_err("refused");
            assert!(e.starts_with("delta:"), "{e}");
        }
        assert!(rebuild(b"[1]", &[], &[], &digest).is_err());
        assert!(rebuild(b"{", &[], &[], &digest).is_err());
    }
}
