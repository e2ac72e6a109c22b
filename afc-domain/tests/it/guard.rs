//! The mass-insertion guard's count (SPEC §4): ids a new blacklist adds to what gates hold, by
//! set difference over `(media, id)` and ranges, never by entry counts.

use std::collections::BTreeSet;
use std::time::Instant;

use afc_domain::blacklist::{realistic_sample, Blacklist, BlacklistDelta, Entry};
use afc_domain::model::{Media, Timestamp};
use afc_domain::package::BlacklistBody;
use afc_domain::rollout::{blacklist_ids_added, MassInsertionGuard};
use proptest::prelude::*;

/// Every `(media, id)` the entries cover, one by one (small lists only).
fn naive(entries: impl IntoIterator<Item = Entry>) -> BTreeSet<(&'static str, u64)> {
    entries
        .into_iter()
        .flat_map(|e| {
            let (lo, hi) = e.bounds();
            (lo..=hi).map(move |id| (e.media.as_str(), id))
        })
        .collect()
}

/// The same entries moved by `offset` (into serial space neither list uses).
fn shifted(list: &Blacklist, version: u64, offset: u64) -> Blacklist {
    Blacklist::from_entries(
        version,
        list.entries().map(|e| Entry { media: e.media, first: e.first + offset, last: e.last + offset }),
    )
}

#[test]
fn a_realistic_full_list_swapping_250000_ids_for_as_many_others_adds_every_one_of_them() {
    let held = Blacklist::from_entries(1, realistic_sample(250_000, 7));
    let swapped = shifted(&held, 2, 1_000_000_000_000_000);
    assert_eq!(held.entry_count(), swapped.entry_count(), "the same number of ids");
    assert_eq!(held.item_count(), swapped.item_count(), "the same number of entries");
    let t = Instant::now();
    let added = held.ids_added_by(&swapped);
    let took = t.elapsed();
    assert_eq!(added, held.entry_count());
    assert!(added >= 250_000, "{added}");
    let guard = MassInsertionGuard::new(10_000);
    let c = guard.check(&held, &BlacklistBody::Full(swapped), "op-wang", Timestamp(0)).unwrap();
    assert_eq!(c.map(|c| c.added), Some(added), "held for a second engineer");
    println!("250,000-id disjoint swap: {added} ids added, counted in {took:?}");

    // The same ids sent again with a few new ones: only the new ones count.
    let mut entries: Vec<Entry> = held.entries().collect();
    entries.extend((0..25).map(|i| Entry::single(Media::Token, 9_000_000 + 2 * i)));
    let resent = Blacklist::from_entries(2, entries);
    assert_eq!(held.ids_added_by(&resent), 25);
    assert_eq!(guard.check(&held, &BlacklistBody::Full(resent), "op-wang", Timestamp(0)), Ok(None));
}

#[test]
fn two_million_entry_lists_are_compared_by_one_merge_and_match_a_sorted_id_set() {
    let held = Blacklist::from_entries(1, realistic_sample(1_000_000, 1));
    let new = Blacklist::from_entries(2, realistic_sample(1_000_000, 2));
    let t = Instant::now();
    let added = held.ids_added_by(&new);
    let took = t.elapsed();
    println!("1,000,000 vs 1,000,000 realistic entries: {added} ids added, counted in {took:?}");
    // A generous bound for a debug build on a shared machine (the merge takes about 0.1 s there).
    assert!(took.as_secs_f64() < 2.0, "{took:?}");
    let ids = |l: &Blacklist| {
        let mut v: Vec<(&'static str, u64)> =
            l.entries().flat_map(|e| (e.first..=e.last).map(move |id| (e.media.as_str(), id))).collect();
        v.sort_unstable();
        v
    };
    let (old_ids, new_ids) = (ids(&held), ids(&new));
    let expect = new_ids.iter().filter(|id| old_ids.binary_search(id).is_err()).count() as u64;
    assert_eq!(added, expect);
    assert!(expect > 900_000, "two independent samples barely overlap: {expect}");
}

#[test]
fn ranges_of_billions_of_ids_are_counted_arithmetically_and_saturate_at_the_whole_space() {
    let svc = |first, last| Entry::range(Media::Svc, first, last).unwrap();
    let held = Blacklist::from_entries(1, [svc(0, 999_999_999_999)]);
    let new = Blacklist::from_entries(2, [svc(500_000_000_000, 1_999_999_999_999)]);
    let t = Instant::now();
    assert_eq!(held.ids_added_by(&new), 1_000_000_000_000);
    assert_eq!(new.ids_added_by(&held), 500_000_000_000);
    // A range swallowing singles and ranges of the old list adds only the gaps between them.
    let old = Blacklist::from_entries(1, [svc(10, 10), svc(20, 29), svc(40, 40)]);
    let wide = Blacklist::from_entries(2, [svc(0, 49)]);
    assert_eq!(old.ids_added_by(&wide), 50 - 12);
    // Every id of every medium: more than a u64 holds.
    let all = Blacklist::from_entries(2, Media::ALL.map(|m| Entry::range(m, 0, u64::MAX).unwrap()));
    assert_eq!(Blacklist::empty().ids_added_by(&all), u64::MAX);
    assert_eq!(all.ids_added_by(&all), 0);
    let d = BlacklistDelta { from_version: 1, to_version: 2, add: vec![svc(0, u64::MAX)], remove: vec![] };
    assert_eq!(d.ids_added_to(&held), u64::MAX - 999_999_999_999);
    assert!(t.elapsed().as_millis() < 100, "{:?}", t.elapsed());
}

fn arb_entry() -> impl Strategy<Value = Entry> {
    let media = prop_oneof![Just(Media::Svc), Just(Media::Qr), Just(Media::Token)];
    let near = (0u64..300, 0u64..25).prop_map(|(f, len)| (f, f + len));
    let edge = (0u64..6, 0u64..6).prop_map(|(a, b)| (u64::MAX - a, u64::MAX - b));
    (media, prop_oneof![8 => near, 1 => edge]).prop_map(|(media, (first, last))| Entry { media, first, last })
}

proptest! {
    #[test]
    fn ids_added_by_a_full_list_are_its_set_difference(
        old in prop::collection::vec(arb_entry(), 0..30),
        new in prop::collection::vec(arb_entry(), 0..30),
    ) {
        let held = Blacklist::from_entries(1, old.iter().copied());
        let list = Blacklist::from_entries(2, new.iter().copied());
        let expect = naive(new.iter().copied()).difference(&naive(old.iter().copied())).count() as u64;
        prop_assert_eq!(held.ids_added_by(&list), expect);
        prop_assert_eq!(blacklist_ids_added(&held, &BlacklistBody::Full(list)), Ok(expect));
    }

    #[test]
    fn ids_added_by_a_delta_are_the_new_ids_of_the_list_it_makes(
        old in prop::collection::vec(arb_entry(), 0..30),
        add in prop::collection::vec(arb_entry(), 0..15),
        remove in prop::collection::vec(arb_entry(), 0..15),
    ) {
        let held = Blacklist::from_entries(1, old.iter().copied());
        let d = BlacklistDelta { from_version: 1, to_version: 2, add: add.clone(), remove };
        let mut made = held.clone();
        made.apply_delta(&d).unwrap();
        let before = naive(old.iter().copied());
        let expect = naive(made.entries()).difference(&before).count() as u64;
        prop_assert_eq!(expect, naive(add.iter().copied()).difference(&before).count() as u64);
        prop_assert_eq!(d.ids_added_to(&held), expect);
        prop_assert_eq!(blacklist_ids_added(&held, &BlacklistBody::Delta(d)), Ok(expect));
        prop_assert_eq!(held.ids_added_by(&made), expect);
    }
}
