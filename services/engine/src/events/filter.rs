//! Which envelopes a subscriber receives: Docker's events filter, plus berth's `topic` and
//! `namespace` keys and the rule that internal task events reach only `type=task` subscribers.

use berth_core::Result;
use berth_proto::berth::events::v1::{self as pb, EventType};
use berth_proto::berth::types::v1 as types;

use crate::filters::Args;

/// Keys a Subscribe request may use.
pub const KEYS: &[&str] = &[
    "type",
    "event",
    "action",
    "container",
    "image",
    "label",
    "network",
    "volume",
    "daemon",
    "scope",
    "plugin",
    "topic",
    "namespace",
];

/// Docker's spelling of an event type.
pub fn type_name(t: EventType) -> &'static str {
    match t {
        EventType::Unspecified => "",
        EventType::Container => "container",
        EventType::Image => "image",
        EventType::Volume => "volume",
        EventType::Network => "network",
        EventType::Daemon => "daemon",
        EventType::Plugin => "plugin",
        EventType::Task => "task",
        EventType::Sandbox => "sandbox",
    }
}

/// A compiled events filter.
#[derive(Debug, Clone)]
pub struct EventFilter {
    args: Args,
    /// Namespace to deliver; `None` = all (`namespace=*`).
    namespace: Option<String>,
}

impl EventFilter {
    /// Compiles `filters` for a caller in `call_namespace`.
    pub fn new(filters: &[types::Filter], call_namespace: &str) -> Result<Self> {
        let args = Args::parse(filters, KEYS)?;
        let namespace = if args.contains("namespace") {
            if args.values("namespace").any(|v| v == "*") {
                None
            } else {
                // Several namespaces: checked by exact_match below.
                Some(String::new())
            }
        } else {
            Some(call_namespace.to_string())
        };
        Ok(Self { args, namespace })
    }

    /// Whether `ev` passes.
    pub fn matches(&self, ev: &pb::Envelope) -> bool {
        let a = &self.args;
        let ty = ev.r#type();
        // Internal task payloads go only to those who ask for them.
        if ty == EventType::Task && !a.values("type").any(|v| v == "task") {
            return false;
        }
        // So are pod sandbox events (the CRI's; Docker clients know no such type).
        if ty == EventType::Sandbox && !a.values("type").any(|v| v == "sandbox") {
            return false;
        }
        let namespace_ok = match &self.namespace {
            None => true,
            Some(ns) if ns.is_empty() => a.exact_match("namespace", &ev.namespace),
            Some(ns) => ev.namespace == *ns,
        };
        if !namespace_ok {
            return false;
        }
        let empty = std::collections::HashMap::new();
        let actor = ev.actor.as_ref();
        let id = actor.map(|a| a.id.as_str()).unwrap_or("");
        let attrs = actor.map(|a| &a.attributes).unwrap_or(&empty);
        let attr = |k: &str| attrs.get(k).map(String::as_str).unwrap_or("");

        self.match_action(&ev.action)
            && a.exact_match("type", type_name(ty))
            && self.match_scope(&ev.scope)
            && self.match_topic(&ev.topic)
            && (a.exact_match("daemon", id) || a.exact_match("daemon", attr("name")))
            && (a.fuzzy_match("container", id) || a.fuzzy_match("container", attr("name")))
            && (a.fuzzy_match("plugin", id) || a.fuzzy_match("plugin", attr("name")))
            && (a.fuzzy_match("volume", id) || a.fuzzy_match("volume", attr("name")))
            && (a.fuzzy_match("network", id) || a.fuzzy_match("network", attr("name")))
            && self.match_image(ty, id, attrs)
            && a.match_kv_list("label", attrs)
    }

    /// `event` and `action` are synonyms. `exec_create`, `exec_start` and `health_status`
    /// match by prefix, because those actions carry a suffix (`exec_start: sh -c ...`).
    fn match_action(&self, action: &str) -> bool {
        let a = &self.args;
        ["event", "action"].iter().all(|key| {
            if !a.contains(key) {
                return true;
            }
            a.values(key).any(|v| {
                v == action
                    || (matches!(v, "exec_create" | "exec_start" | "health_status")
                        && action.starts_with(v))
            })
        })
    }

    fn match_scope(&self, scope: &str) -> bool {
        let scope = if scope.is_empty() { "local" } else { scope };
        self.args.exact_match("scope", scope)
    }

    fn match_topic(&self, topic: &str) -> bool {
        if !self.args.contains("topic") {
            return true;
        }
        self.args
            .values("topic")
            .any(|v| match v.strip_suffix('*') {
                Some(prefix) => topic.starts_with(prefix),
                None => topic == v,
            })
    }

    /// Image events match by id or name; container events by the image they run. Both are
    /// also compared without their tag.
    fn match_image(
        &self,
        ty: EventType,
        id: &str,
        attrs: &std::collections::HashMap<String, String>,
    ) -> bool {
        let a = &self.args;
        if !a.contains("image") {
            return true;
        }
        let name_attr = if ty == EventType::Image {
            "name"
        } else {
            "image"
        };
        let name = attrs.get(name_attr).map(String::as_str).unwrap_or("");
        [id, name, strip_tag(id), strip_tag(name)]
            .iter()
            .any(|s| !s.is_empty() && a.values("image").any(|v| v == *s))
    }
}

/// `repo:tag` → `repo` (a `:` in a registry's port is not a tag).
fn strip_tag(s: &str) -> &str {
    let s = s.split('@').next().unwrap_or(s);
    match s.rfind(':') {
        Some(i) if !s[i..].contains('/') => &s[..i],
        _ => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(ty: EventType, action: &str, id: &str, attrs: &[(&str, &str)]) -> pb::Envelope {
        pb::Envelope {
            r#type: ty.into(),
            action: action.into(),
            namespace: "default".into(),
            topic: format!("/{}/{action}", type_name(ty)),
            actor: Some(pb::Actor {
                id: id.into(),
                attributes: attrs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            }),
            ..Default::default()
        }
    }

    fn filter(pairs: &[(&str, &str)]) -> EventFilter {
        let f: Vec<types::Filter> = pairs
            .iter()
            .map(|(k, v)| types::Filter {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect();
        EventFilter::new(&f, "default").unwrap()
    }

    #[test]
    fn type_action_and_container() {
        let start = ev(
            EventType::Container,
            "start",
            "abc123",
            &[("name", "web"), ("image", "busybox")],
        );
        let die = ev(
            EventType::Container,
            "die",
            "abc123",
            &[("name", "web"), ("exitCode", "3")],
        );
        let vol = ev(EventType::Volume, "create", "data", &[("driver", "local")]);
        assert!(filter(&[]).matches(&start));
        assert!(filter(&[("type", "container")]).matches(&start));
        assert!(!filter(&[("type", "container")]).matches(&vol));
        assert!(filter(&[("event", "die")]).matches(&die));
        assert!(!filter(&[("event", "die")]).matches(&start));
        assert!(filter(&[("action", "die"), ("action", "start")]).matches(&start));
        assert!(filter(&[("container", "web")]).matches(&start));
        assert!(filter(&[("container", "abc")]).matches(&start), "id prefix");
        assert!(!filter(&[("container", "db")]).matches(&start));
        assert!(filter(&[("volume", "data")]).matches(&vol));
        assert!(!filter(&[("volume", "data")]).matches(&start));
    }

    #[test]
    fn exec_actions_match_by_prefix() {
        let e = ev(EventType::Container, "exec_start: sh -c true", "c1", &[]);
        assert!(filter(&[("event", "exec_start")]).matches(&e));
        assert!(!filter(&[("event", "exec_die")]).matches(&e));
    }

    #[test]
    fn labels_and_images() {
        let e = ev(
            EventType::Container,
            "create",
            "c1",
            &[("image", "busybox:latest"), ("team", "a"), ("tier", "web")],
        );
        assert!(filter(&[("label", "team")]).matches(&e));
        assert!(filter(&[("label", "team=a"), ("label", "tier=web")]).matches(&e));
        assert!(!filter(&[("label", "team=a"), ("label", "tier=db")]).matches(&e));
        assert!(filter(&[("image", "busybox")]).matches(&e));
        assert!(filter(&[("image", "busybox:latest")]).matches(&e));
        assert!(!filter(&[("image", "alpine")]).matches(&e));
        let img = ev(
            EventType::Image,
            "pull",
            "sha256:1",
            &[("name", "localhost:5000/x:1")],
        );
        assert!(filter(&[("image", "localhost:5000/x")]).matches(&img));
    }

    #[test]
    fn health_status_matches_by_prefix_and_exactly() {
        let e = ev(EventType::Container, "health_status: healthy", "c1", &[]);
        assert!(filter(&[("event", "health_status")]).matches(&e));
        assert!(filter(&[("event", "health_status: healthy")]).matches(&e));
        assert!(!filter(&[("event", "health_status: unhealthy")]).matches(&e));
        assert!(!filter(&[("event", "health")]).matches(&e));
        // The shim's task event of the same change is berth-internal.
        let t = ev(EventType::Task, "health_status: healthy", "c1", &[]);
        assert!(!filter(&[("event", "health_status")]).matches(&t));
    }

    #[test]
    fn task_events_only_with_type_task_and_namespaces() {
        let t = ev(EventType::Task, "exit", "c1", &[]);
        assert!(!filter(&[]).matches(&t));
        assert!(filter(&[("type", "task")]).matches(&t));
        let mut other = ev(EventType::Container, "start", "c1", &[]);
        other.namespace = "k8s.io".into();
        assert!(!filter(&[]).matches(&other));
        assert!(filter(&[("namespace", "*")]).matches(&other));
        assert!(filter(&[("namespace", "k8s.io")]).matches(&other));
        assert!(filter(&[("topic", "/container/*"), ("namespace", "*")]).matches(&other));
        assert!(!filter(&[("topic", "/image/*"), ("namespace", "*")]).matches(&other));
    }

    #[test]
    fn strip_tags() {
        assert_eq!(strip_tag("busybox:latest"), "busybox");
        assert_eq!(strip_tag("localhost:5000/x"), "localhost:5000/x");
        assert_eq!(strip_tag("localhost:5000/x:1"), "localhost:5000/x");
        assert_eq!(strip_tag("x@sha256:abc"), "x");
    }
}
