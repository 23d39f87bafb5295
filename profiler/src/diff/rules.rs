//! `--fail-on` rules: `NAME>10%` (the share of samples whose stack holds a
//! frame whose name contains NAME grew by more than 10% of what it was, significantly),
//! `any>10%` (any function, by the corrected test), `p99(ROUTE)>10%` (a
//! route's p99 grew by more than 10%, significantly).

use super::{Capture, Failed, Function, stats};

/// A rule that does not parse.
#[derive(Debug, thiserror::Error)]
#[error(
    "--fail-on {rule:?}: {why}; write NAME>10% (a frame's share), any>10% (any function) or p99(ROUTE)>10% (a route's p99, ROUTE as `GET /users/:id` or `/users/:id`)"
)]
pub struct RuleError {
    rule: String,
    why: &'static str,
}

/// What a rule watches.
#[derive(Clone, Debug, PartialEq)]
pub enum Subject {
    /// Samples whose stack holds a frame containing this name.
    Frame(String),
    /// Every function compared.
    Any,
    /// A route's p99.
    P99(String),
}

/// One `--fail-on` rule.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// As given.
    pub text: String,
    /// What it watches.
    pub subject: Subject,
    /// The relative growth it allows (0.1: 10%).
    pub limit: f64,
}

impl std::str::FromStr for Rule {
    type Err = RuleError;

    fn from_str(s: &str) -> Result<Rule, RuleError> {
        let bad = |why| RuleError {
            rule: s.to_string(),
            why,
        };
        let (lhs, rhs) = s.rsplit_once('>').ok_or(bad("no `>`"))?;
        let limit = rhs
            .trim()
            .strip_suffix('%')
            .ok_or(bad("the limit is not a percentage"))?
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|x| x.is_finite() && *x >= 0.0)
            .ok_or(bad("the limit is not a number of 0 or more"))?
            / 100.0;
        let lhs = lhs.trim();
        let subject = if lhs == "any" {
            Subject::Any
        } else if let Some(route) = lhs.strip_prefix("p99(").and_then(|r| r.strip_suffix(')')) {
            if route.trim().is_empty() {
                return Err(bad("no route in p99()"));
            }
            Subject::P99(route.trim().to_string())
        } else if lhs.is_empty() {
            return Err(bad("no frame name before `>`"));
        } else {
            Subject::Frame(lhs.to_string())
        };
        Ok(Rule {
            text: s.to_string(),
            subject,
            limit,
        })
    }
}

/// A requests.json's routes: (`METHOD /route`, p99 ms, error ratio).
pub fn routes(r: &serde_json::Value) -> Vec<(String, f64, f64)> {
    route_entries(r)
        .into_iter()
        .map(|(name, x)| {
            let n = x["requests"].as_f64().unwrap_or(0.0);
            let errors =
                x["errors_5xx"].as_f64().unwrap_or(0.0) + x["errors_4xx"].as_f64().unwrap_or(0.0);
            (
                name,
                x["duration_ms"]["p99"].as_f64().unwrap_or(0.0),
                if n > 0.0 { errors / n } else { 0.0 },
            )
        })
        .collect()
}

fn route_entries(r: &serde_json::Value) -> Vec<(String, &serde_json::Value)> {
    r["processes"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["routes"].as_array().into_iter().flatten())
        .map(|x| {
            (
                format!(
                    "{} {}",
                    x["method"].as_str().unwrap_or("?"),
                    x["route"].as_str().unwrap_or("?")
                ),
                x,
            )
        })
        .collect()
}

/// The route `want` (`GET /r` or `/r`, any method) with the most requests.
fn find_route<'a>(r: &'a serde_json::Value, want: &str) -> Option<&'a serde_json::Value> {
    route_entries(r)
        .into_iter()
        .filter(|(name, x)| name == want || x["route"].as_str() == Some(want))
        .max_by(|a, b| {
            a.1["requests"]
                .as_u64()
                .unwrap_or(0)
                .cmp(&b.1["requests"].as_u64().unwrap_or(0))
        })
        .map(|(_, x)| x)
}

/// A route's non-empty buckets as `(lower, upper, count)`. A capture
/// written before buckets carried their lower bound gets the upper bound
/// of the bucket listed before (lower than the real one: the bounds only
/// widen, nothing is flagged that should not be).
fn histogram(route: &serde_json::Value) -> Vec<(f64, f64, u64)> {
    let mut below = 0.0;
    route["duration_ms"]["histogram"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| {
            let le = b["le_ms"].as_f64()?;
            let ge = b["ge_ms"].as_f64().unwrap_or(below);
            below = le;
            Some((ge, le, b["count"].as_u64()?))
        })
        .collect()
}

impl Rule {
    /// The failures this rule finds between two captures.
    pub fn check(&self, before: &Capture, after: &Capture, functions: &[Function]) -> Vec<Failed> {
        let grew = |b: f64, a: f64| {
            if b > 0.0 {
                (a - b) / b
            } else if a > 0.0 {
                f64::INFINITY
            } else {
                0.0
            }
        };
        match &self.subject {
            Subject::Frame(name) => {
                let (n1, n2) = (before.total(), after.total());
                let (b, a) = (before.holding(name), after.holding(name));
                let (sb, sa) = (b as f64 / n1 as f64, a as f64 / n2 as f64);
                let p = stats::two_proportion_p(b, n1, a, n2);
                let change = grew(sb, sa);
                (change > self.limit && p < 0.05 && sa - sb >= stats::MIN_POINTS)
                    .then(|| Failed {
                        rule: self.text.clone(),
                        subject: name.clone(),
                        before: sb,
                        after: sa,
                        change,
                        why: format!(
                            "share of samples with {name} in the stack grew {:.1}% (more than {:.1}%), z-test p = {p:.1e}",
                            100.0 * change,
                            100.0 * self.limit
                        ),
                    })
                    .into_iter()
                    .collect()
            }
            Subject::Any => functions
                .iter()
                .filter(|f| f.significant && grew(f.total_before, f.total_after) > self.limit)
                .map(|f| Failed {
                    rule: self.text.clone(),
                    subject: f.name.clone(),
                    before: f.total_before,
                    after: f.total_after,
                    change: grew(f.total_before, f.total_after),
                    why: format!(
                        "total share grew {:.1}% (more than {:.1}%), significant after Holm's correction (p = {:.1e})",
                        100.0 * grew(f.total_before, f.total_after),
                        100.0 * self.limit,
                        f.p_value
                    ),
                })
                .collect(),
            Subject::P99(route) => {
                let (Some(b), Some(a)) = (
                    before.requests.as_ref().and_then(|r| find_route(r, route)),
                    after.requests.as_ref().and_then(|r| find_route(r, route)),
                ) else {
                    return vec![Failed {
                        rule: self.text.clone(),
                        subject: route.clone(),
                        before: 0.0,
                        after: 0.0,
                        change: 0.0,
                        why: "the route is not in both captures' requests.json: cannot judge it".into(),
                    }];
                };
                let p99 = |x: &serde_json::Value| x["duration_ms"]["p99"].as_f64().unwrap_or(0.0);
                let (pb, pa) = (p99(b), p99(a));
                let change = grew(pb, pa);
                let (Some((_, b_hi)), Some((a_lo, _))) = (
                    stats::quantile_bounds(&histogram(b), 0.99),
                    stats::quantile_bounds(&histogram(a), 0.99),
                ) else {
                    return Vec::new();
                };
                (change > self.limit && a_lo > b_hi)
                    .then(|| Failed {
                        rule: self.text.clone(),
                        subject: route.clone(),
                        before: pb,
                        after: pa,
                        change,
                        why: format!(
                            "p99 {pb:.2} -> {pa:.2} ms (+{:.1}%, more than {:.1}%); the 95% bounds do not overlap (before at most {b_hi:.2} ms, after at least {a_lo:.2} ms)",
                            100.0 * change,
                            100.0 * self.limit
                        ),
                    })
                    .into_iter()
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_or_say_what_is_wrong() {
        let r: Rule = "work_beta>10%".parse().unwrap();
        assert_eq!(r.subject, Subject::Frame("work_beta".into()));
        assert!((r.limit - 0.1).abs() < 1e-12);
        assert_eq!("any>5%".parse::<Rule>().unwrap().subject, Subject::Any);
        assert_eq!(
            "p99(GET /slow/:id)>10%".parse::<Rule>().unwrap().subject,
            Subject::P99("GET /slow/:id".into())
        );
        for bad in [
            "work_beta",
            "work_beta>10",
            ">10%",
            "p99()>1%",
            "x>-1%",
            "x>many%",
        ] {
            let e = bad.parse::<Rule>().unwrap_err().to_string();
            assert!(e.contains("NAME>10%"), "{bad}: {e}");
        }
    }
}
