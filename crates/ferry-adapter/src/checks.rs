//! Helpers every target's validation checks share.

use crate::AResult;
use ferry_model::ValidationCheck;
use std::time::{Duration, Instant};

/// A check's parameter.
pub fn param<'a>(c: &'a ValidationCheck, key: &str) -> Option<&'a str> {
    c.params.get(key).map(String::as_str)
}

/// Retries `f` until it succeeds or `within` passes (a booting guest is not up at once);
/// the last error is the answer.
pub async fn retry<T, F, Fut>(within: Duration, mut f: F) -> AResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = AResult<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}
