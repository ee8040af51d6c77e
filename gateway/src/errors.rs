//! Docker's error wording, where clients match on it, and JSON body parsing.

use berth_core::{Error, ErrorKind, Result};
use serde::de::DeserializeOwned;

/// Parses a JSON request body; bad JSON is a 400 naming the problem.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| Error::invalid_argument(format!("invalid JSON: {e}")))
}

/// Parses an optional JSON body: empty means `T::default()`.
pub fn parse_json_or_default<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        parse_json(body)
    }
}

const OTHER_OBJECTS: [&str; 5] = ["image", "network", "volume", "exec", "snapshot"];

/// Turns a service's `NotFound` about the object the route names into Docker's
/// `No such <what>: <input>`, which clients match on. A `NotFound` about something else (a
/// network a container needs, an image) keeps its message.
pub fn no_such(what: &'static str, input: &str) -> impl FnOnce(Error) -> Error + use<> {
    let input = input.to_string();
    move |err| {
        if !err.is(ErrorKind::NotFound) {
            return err;
        }
        let msg = err.message().to_ascii_lowercase();
        if msg.starts_with(&format!("no such {what}")) {
            return Error::not_found(format!("No such {what}: {input}"));
        }
        let about_other = OTHER_OBJECTS
            .iter()
            .filter(|o| !what.starts_with(**o))
            .any(|o| msg.contains(o));
        if about_other {
            err
        } else {
            Error::not_found(format!("No such {what}: {input}"))
        }
    }
}

/// `No such container: <input>` for any `NotFound`.
pub fn container_not_found(input: &str) -> impl FnOnce(Error) -> Error + use<> {
    no_such("container", input)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_wording() {
        let e = container_not_found("web")(Error::not_found("container web not found"));
        assert_eq!(e.message(), "No such container: web");
        let e = container_not_found("web")(Error::not_found("no such container: web"));
        assert_eq!(e.message(), "No such container: web");
        let e = container_not_found("web")(Error::not_found("network mynet not found"));
        assert_eq!(e.message(), "network mynet not found");
        let e = container_not_found("web")(Error::failed_precondition("busy"));
        assert_eq!(e.message(), "busy");
        let e = no_such("image", "busybox")(Error::not_found("image busybox not found"));
        assert_eq!(e.message(), "No such image: busybox");
    }

    #[test]
    fn json_errors_are_bad_requests() {
        let e = parse_json::<serde_json::Value>(b"{nope").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.message().starts_with("invalid JSON"), "{}", e.message());
        let v: serde_json::Value = parse_json_or_default(b"  ").unwrap();
        assert!(v.is_null());
    }
}
