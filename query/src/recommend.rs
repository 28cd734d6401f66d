//! Recommendations ranked in the query process (ADR 10, ADR 20). The recommender's Redis
//! model holds each user's decayed affinities and reads and the published articles indexed
//! by category and tag; [`rank`] turns a snapshot of them into the ranking, and
//! [`Rankings`] keeps each user's last ranking for as long as what it was computed from
//! has not changed.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

/// The longest list the API gives (`limit` ≤ 100): rankings are computed and kept at this
/// length, and a shorter request gets their first items (the same it would get alone).
pub const KEPT: usize = 100;

/// One ranked article.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranked {
    /// The article's id as the model spells it.
    pub id: String,
    /// Σ of the affinities it matches, relative to the model's epoch.
    pub raw_score: f64,
    /// When it was published (the index's score: microseconds since the epoch).
    pub published: f64,
    /// The category and tags that matched, strongest first.
    pub reasons: Vec<String>,
}

/// What a ranking was computed from: the model's version, the published index's change
/// count, the user's affinities and how many articles they read, and the candidates per
/// index. The same basis gives the same ranking.
#[derive(Debug, Clone, PartialEq)]
pub struct Basis {
    /// The model's active version.
    pub version: String,
    /// Changes to the published index so far (`listing`).
    pub listing: String,
    /// The user's affinities (`aff:<user>`), as stored, sorted by key.
    pub affinities: Vec<(String, String)>,
    /// The number of articles the user read.
    pub reads: usize,
    /// Newest articles read per index.
    pub candidates: u32,
}

/// Ranks the published articles a user has not read: the newest `candidates` of each
/// category and tag the user has an affinity to (`windows`, in the order of `affinities`,
/// which is sorted by key: categories before tags) score the sum of the matched
/// affinities (a tag named like the category counts once); then newest publication, then
/// highest id. Articles matching nothing follow, newest first, from `recent` (the newest
/// published), at most `limit` of them. Returns at most `limit` items; reasons by weight,
/// highest first, then name.
pub fn rank(
    affinities: &[(String, f64)],
    read: &HashSet<String>,
    windows: &[Vec<(String, f64)>],
    recent: &[(String, f64)],
    limit: usize,
) -> Vec<Ranked> {
    struct Found<'a> {
        id: &'a str,
        score: f64,
        published: f64,
        reasons: Vec<(&'a str, f64)>,
    }
    let mut at: HashMap<&str, usize> = HashMap::new();
    let mut scored: Vec<Found<'_>> = Vec::new();
    for ((key, weight), window) in affinities.iter().zip(windows) {
        let name = newsroom_infra::read_models::recommend::affinity_name(key);
        for (id, published) in window {
            if read.contains(id) {
                continue;
            }
            let index = *at.entry(id).or_insert_with(|| {
                scored.push(Found {
                    id,
                    score: 0.0,
                    published: *published,
                    reasons: Vec::new(),
                });
                scored.len() - 1
            });
            let found = &mut scored[index];
            if !found.reasons.iter().any(|(n, _)| *n == name) {
                found.score += weight;
                found.reasons.push((name, *weight));
            }
        }
    }
    let mut fillers = 0;
    for (id, published) in recent {
        if fillers >= limit {
            break;
        }
        if !read.contains(id) && !at.contains_key(id.as_str()) {
            scored.push(Found {
                id,
                score: 0.0,
                published: *published,
                reasons: Vec::new(),
            });
            fillers += 1;
        }
    }
    let order = |a: &Found<'_>, b: &Found<'_>| {
        b.score
            .total_cmp(&a.score)
            .then(b.published.total_cmp(&a.published))
            .then(b.id.cmp(a.id))
    };
    if scored.len() > limit && limit > 0 {
        scored.select_nth_unstable_by(limit - 1, order);
    }
    scored.truncate(limit);
    scored.sort_unstable_by(order);
    scored
        .into_iter()
        .map(|mut f| {
            f.reasons
                .sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
            Ranked {
                id: f.id.to_owned(),
                raw_score: f.score,
                published: f.published,
                reasons: f.reasons.into_iter().map(|(n, _)| n.to_owned()).collect(),
            }
        })
        .collect()
}

/// Each user's last ranking, with what it was computed from (bounded: past its capacity
/// an arbitrary tenth is forgotten).
#[derive(Clone)]
pub struct Rankings {
    kept: Arc<Mutex<HashMap<uuid::Uuid, Kept>>>,
    users: usize,
}

/// A ranking and what it was computed from.
type Kept = (Basis, Arc<Vec<Ranked>>);

impl Rankings {
    /// Keeps the rankings of up to `users` users (0: none).
    pub fn new(users: usize) -> Self {
        Rankings {
            kept: Arc::default(),
            users,
        }
    }

    /// `user`'s ranking if it was computed from `basis`.
    pub fn get(&self, user: uuid::Uuid, basis: &Basis) -> Option<Arc<Vec<Ranked>>> {
        let kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        kept.get(&user)
            .filter(|(b, _)| b == basis)
            .map(|(_, ranking)| ranking.clone())
    }

    /// Keeps `user`'s ranking computed from `basis`.
    pub fn keep(&self, user: uuid::Uuid, basis: Basis, ranking: Arc<Vec<Ranked>>) {
        if self.users == 0 {
            return;
        }
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        if kept.len() >= self.users && !kept.contains_key(&user) {
            let forget: Vec<uuid::Uuid> =
                kept.keys().take(self.users.div_ceil(10)).copied().collect();
            for user in forget {
                kept.remove(&user);
            }
        }
        kept.insert(user, (basis, ranking));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(items: &[(&str, f64)]) -> Vec<(String, f64)> {
        items.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    #[test]
    fn ranks_by_summed_affinity_then_newest_then_id_and_fills_with_unmatched_articles() {
        let affinities = entries(&[("cat:sports", 2.0), ("tag:f1", 3.0), ("tag:sports", 5.0)]);
        let windows = vec![
            entries(&[("d", 40.0), ("a", 30.0), ("b", 20.0)]),
            entries(&[("b", 20.0), ("c", 10.0)]),
            // Named like the category: counts once, as the category.
            entries(&[("a", 30.0)]),
        ];
        let recent = entries(&[
            ("e", 50.0),
            ("d", 40.0),
            ("a", 30.0),
            ("x", 5.0),
            ("y", 4.0),
        ]);
        let read: HashSet<String> = ["d".to_owned()].into();
        let ranked = rank(&affinities, &read, &windows, &recent, 4);
        let ids: Vec<&str> = ranked.iter().map(|r| r.id.as_str()).collect();
        // b: 2 + 3; c: 3; a: 2 (tag:sports is the category's name); e: unmatched, newest.
        assert_eq!(ids, ["b", "c", "a", "e"]);
        assert_eq!(ranked[0].raw_score, 5.0);
        assert_eq!(ranked[0].reasons, ["f1", "sports"]);
        assert_eq!(ranked[2].reasons, ["sports"]);
        assert!(ranked[3].reasons.is_empty());
        // Ties: newer first, then the higher id.
        let tied = rank(
            &entries(&[("tag:t", 1.0)]),
            &HashSet::new(),
            &[entries(&[("m", 9.0), ("n", 7.0), ("o", 9.0)])],
            &[],
            3,
        );
        let ids: Vec<&str> = tied.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["o", "m", "n"]);
    }

    #[test]
    fn a_shorter_list_is_the_start_of_a_longer_one() {
        let affinities = entries(&[("cat:politics", 1.5), ("tag:a", 0.5), ("tag:b", 0.5)]);
        let window = |offset: usize| -> Vec<(String, f64)> {
            (0..60)
                .filter(|i| !(i + offset).is_multiple_of(3))
                .map(|i| (format!("n{i:03}"), (1000 - i) as f64))
                .collect()
        };
        let windows = vec![window(0), window(1), window(2)];
        let recent: Vec<(String, f64)> = (0..200)
            .map(|i| (format!("r{i:03}"), (900 - i) as f64))
            .collect();
        let read: HashSet<String> = ["n004".to_owned(), "r001".to_owned()].into();
        let long = rank(&affinities, &read, &windows, &recent, KEPT);
        assert_eq!(long.len(), KEPT);
        for limit in [1, 7, 20, 57, 99] {
            assert_eq!(
                rank(&affinities, &read, &windows, &recent, limit),
                long[..limit]
            );
        }
    }
}
