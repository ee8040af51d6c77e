//! The caller's deadline (`grpc-timeout`) answered as DEADLINE_EXCEEDED.
//!
//! tonic's server enforces `grpc-timeout` itself, but answers an expired call with CANCELLED
//! ("Timeout expired"); that answer can reach the caller before its own deadline fires, and
//! then the caller sees CANCELLED where a Go server (containerd, kubelet's expectations,
//! critest's "should timeout if requested") gives DEADLINE_EXCEEDED. This layer, inside
//! tonic's, ends the call a moment earlier with DEADLINE_EXCEEDED.

use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tower::{Layer, Service};

/// How much earlier than tonic's own timer this layer answers.
const AHEAD: Duration = Duration::from_millis(2);

/// Answers a call whose `grpc-timeout` expires with DEADLINE_EXCEEDED.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeadlineLayer;

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline { inner }
    }
}

/// The service of [`DeadlineLayer`].
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
}

impl<S, B, R> Service<http::Request<B>> for Deadline<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Send,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let timeout = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_timeout);
        let fut = self.inner.call(req);
        match timeout {
            None => Box::pin(fut),
            Some(t) => Box::pin(async move {
                match tokio::time::timeout(t.saturating_sub(AHEAD), fut).await {
                    Ok(out) => out,
                    Err(_) => Ok(tonic::Status::deadline_exceeded(
                        "the call's deadline (grpc-timeout) passed",
                    )
                    .into_http()),
                }
            }),
        }
    }
}

/// A `grpc-timeout` value: at most 8 digits and a unit (H, M, S, m, u, n).
fn parse_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse_as_the_grpc_spec_writes_them() {
        assert_eq!(parse_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_timeout("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(
            parse_timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        for bad in ["", "S", "5", "5x", "123456789S", "-5S"] {
            assert_eq!(parse_timeout(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn an_expired_call_is_deadline_exceeded_and_a_quick_one_passes() {
        let slow = tower::service_fn(|_req: http::Request<()>| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(String::from("late")))
        });
        let mut svc = DeadlineLayer.layer(slow);
        let req = http::Request::builder()
            .header("grpc-timeout", "20m")
            .body(())
            .unwrap();
        let resp = svc.call(req).await.unwrap();
        assert_eq!(resp.headers()["grpc-status"], "4");
        let quick = tower::service_fn(|_req: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(String::from("ok")))
        });
        let mut svc = DeadlineLayer.layer(quick);
        let req = http::Request::builder()
            .header("grpc-timeout", "1S")
            .body(())
            .unwrap();
        assert_eq!(svc.call(req).await.unwrap().into_body(), "ok");
    }
}
