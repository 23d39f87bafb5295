//! The statistics of `diff`: a two-proportion z-test on sample counts,
//! Holm's step-down correction, and distribution-free confidence bounds
//! of a quantile from a histogram.

/// A change of a share smaller than this (half a point) is not called a
/// change, however many samples make it significant: two runs of one
/// program differ by that much for reasons a profile does not show (the
/// host's speed drifts).
pub const MIN_POINTS: f64 = 0.005;

/// Two-sided p-value that `a` of `n1` and `b` of `n2` come from the same
/// proportion (pooled two-proportion z-test; 1 when nothing varies).
pub fn two_proportion_p(a: u64, n1: u64, b: u64, n2: u64) -> f64 {
    if n1 == 0 || n2 == 0 {
        return 1.0;
    }
    let (n1f, n2f) = (n1 as f64, n2 as f64);
    let p = (a + b) as f64 / (n1f + n2f);
    let se = (p * (1.0 - p) * (1.0 / n1f + 1.0 / n2f)).sqrt();
    if se == 0.0 {
        return 1.0;
    }
    let z = (a as f64 / n1f - b as f64 / n2f) / se;
    erfc(z.abs() / std::f64::consts::SQRT_2)
}

/// Holm's step-down procedure: which of `p` are rejected at family-wise
/// error `alpha`.
pub fn holm(p: &[f64], alpha: f64) -> Vec<bool> {
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let m = p.len();
    let mut out = vec![false; m];
    for (rank, &i) in order.iter().enumerate() {
        if p[i] <= alpha / (m - rank) as f64 {
            out[i] = true;
        } else {
            break;
        }
    }
    out
}

/// The complementary error function (Numerical Recipes' erfcc: fractional
/// error below 1.2e-7).
pub fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

/// The 95% confidence bounds of quantile `q` of the values a histogram
/// counts (`(lower bound, upper bound, count)` buckets in order, empty
/// ones left out), distribution-free: the order statistics at ranks
/// n·q ∓ 1.96·√(n·q·(1−q)); the lower bound is the lower edge of its
/// bucket, the upper one the upper edge.
pub fn quantile_bounds(buckets: &[(f64, f64, u64)], q: f64) -> Option<(f64, f64)> {
    let n: u64 = buckets.iter().map(|b| b.2).sum();
    if n == 0 {
        return None;
    }
    let nf = n as f64;
    let half = 1.96 * (nf * q * (1.0 - q)).sqrt();
    let lo_rank = ((nf * q - half).floor() as u64).clamp(1, n);
    let hi_rank = ((nf * q + half).ceil() as u64).clamp(1, n);
    let at = |rank: u64, upper: bool| {
        let mut seen = 0;
        for &(ge, le, c) in buckets {
            seen += c;
            if seen >= rank {
                return if upper { le } else { ge };
            }
        }
        buckets.last().map_or(0.0, |b| b.1)
    };
    Some((at(lo_rank, false), at(hi_rank, true)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erfc_matches_known_values() {
        for (x, want) in [
            (0.0, 1.0),
            (0.5, 0.479_500_12),
            (1.0, 0.157_299_21),
            (2.0, 0.004_677_73),
            (-1.0, 1.842_700_79),
        ] {
            assert!((erfc(x) - want).abs() < 1e-6, "erfc({x}) = {}", erfc(x));
        }
    }

    #[test]
    fn the_z_test_tells_a_change_from_noise() {
        // 30% against 34% of 6000 samples each: z = 4.7.
        assert!(two_proportion_p(1800, 6000, 2040, 6000) < 1e-5);
        // 30% against 30.5%: within noise.
        assert!(two_proportion_p(1800, 6000, 1830, 6000) > 0.5);
        assert_eq!(two_proportion_p(0, 100, 0, 100), 1.0);
    }

    #[test]
    fn holm_steps_down() {
        // m = 4: 0.01 <= 0.05/4, 0.015 <= 0.05/3, 0.03 > 0.05/2: stop.
        assert_eq!(
            holm(&[0.03, 0.01, 0.5, 0.015], 0.05),
            vec![false, true, false, true]
        );
        assert_eq!(holm(&[], 0.05), Vec::<bool>::new());
    }

    #[test]
    fn quantile_bounds_bracket_the_quantile() {
        // 100 values of 1 ms, then 1 of 50 ms: p50 is 1 ms both ways.
        let b = [(0.0, 1.0, 100), (48.0, 50.0, 1)];
        assert_eq!(quantile_bounds(&b, 0.5), Some((0.0, 1.0)));
        // 1000 values spread evenly over 1..=10 ms: p99's bounds are in
        // the last bucket.
        let even: Vec<(f64, f64, u64)> =
            (1..=10).map(|i| (i as f64 - 1.0, i as f64, 100)).collect();
        let (lo, hi) = quantile_bounds(&even, 0.99).unwrap();
        assert_eq!((lo, hi), (9.0, 10.0));
        assert_eq!(quantile_bounds(&[], 0.99), None);
    }

    #[test]
    fn a_quantile_in_the_first_listed_bucket_is_bounded_by_its_own_edge() {
        // A route made 30 ms slower (seen in CI): every "after" request
        // in two buckets far above zero. The lower bound of p99 is the
        // first one's lower edge, not zero (the listed bucket before it).
        let before = [
            (19.456, 20.48, 53),
            (20.48, 21.504, 46),
            (22.528, 23.552, 1),
        ];
        let after = [(49.152, 51.2, 97), (51.2, 53.248, 3)];
        let (_, b_hi) = quantile_bounds(&before, 0.99).unwrap();
        let (a_lo, _) = quantile_bounds(&after, 0.99).unwrap();
        assert_eq!((b_hi, a_lo), (23.552, 49.152));
    }
}
