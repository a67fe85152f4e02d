//! For tests: the outside services they need (PostgreSQL, NATS, nginx). Outside CI a missing
//! service skips its tests with a loud `SKIPPED` line; in CI (`CI` set, as `.ci/run` does) it
//! fails them, so a misconfigured CI cannot pass by running nothing.

/// Whether this is a CI run (`CI` set and not empty).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty())
}

/// Says that `test` cannot run without `what`: skipped (None) outside CI, a panic in CI.
pub fn missing<T>(test: &str, what: &str) -> Option<T> {
    assert!(!in_ci(), "{test} needs {what}, and CI is set: in CI these tests must run, not be skipped");
    eprintln!("SKIPPED: {test} needs {what}");
    None
}

/// The URL in the environment variable `var` (e.g. `NATTER_TEST_NATS_URL`), or [`missing`].
pub fn service_url(var: &str, test: &str, what: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => missing(test, &format!("{what}: {var} not set")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_missing_service_fails_in_ci_and_skips_elsewhere() {
        // Decided by CI alone; both outcomes are checked without touching the environment.
        let outcome = std::panic::catch_unwind(|| super::missing::<()>("t", "a service"));
        assert_eq!(outcome.is_err(), super::in_ci());
    }
}
