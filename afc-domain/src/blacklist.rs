//! The blacklist (SPEC §4): `(media, id)` entries and number ranges, a full base plus ordered deltas.
//!
//! A gate asks [`Blacklist::contains`] on every tap, so the list is held in the cheapest form that
//! answers that fast: per medium, a sorted `Vec<u64>` of single ids and a sorted `Vec` of disjoint
//! ranges, both searched by bisection without allocating. The form is canonical: ranges never
//! overlap or touch each other or a single, and a run of two or more consecutive ids is always a
//! range. So two lists holding the same ids are equal, and encode to the same bytes.
//!
//! Card numbers are issued in dense serial ranges per issuer, so the package body encoding
//! ([`Blacklist::encode`], [`BlacklistDelta::encode`]) stores every id as a varint gap from the
//! previous one: about 1–2 bytes per entry on realistic lists ([`realistic_sample`]).
//!
//! Versions: a full list carries the version it is; a delta carries the version it applies to and
//! the version it makes. A delta is applied only to exactly the version it starts from: a gap or a
//! stale delta is an error, never a silent partial update.

use std::fmt;
use std::iter::Peekable;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::model::Media;
use crate::varint::{self, Reader, VarintError};

/// The first byte of an encoded full list.
pub const FULL_MAGIC: u8 = b'B';
/// The first byte of an encoded delta.
pub const DELTA_MAGIC: u8 = b'D';
/// The encoding format, after the magic byte; bumped on any incompatible change. Format 1 holds
/// the sections of svc, qr and token; a list (or delta) with `bank` ids is written as
/// [`FORMAT_BANK`], which appends the bank section (so every list without bank ids keeps its
/// bytes, and a gate of an earlier version refuses, rather than misreads, a list with them).
pub const FORMAT: u8 = 1;
/// The format of a list or delta holding `bank` ids: four sections, svc, qr, token, bank.
pub const FORMAT_BANK: u8 = 2;

/// Lists held per blacklist, one per medium (indexed by [`slot`]).
const MEDIA_SLOTS: usize = 4;

/// The media a list of `format` holds sections for, in order.
fn media_of(format: u8) -> &'static [Media] {
    if format == FORMAT_BANK {
        &Media::ALL
    } else {
        &Media::ALL[..3]
    }
}

/// One blacklist line: a single id (`first == last`) or an inclusive number range of one medium.
///
/// JSON: `{"media": "svc", "first": 1, "last": 9}`, or `{"media": "svc", "id": 5}` for a single
/// id; an inverted range (`first > last`) is refused there. A denied bank token is written
/// `{"media": "bank", "token": "<64 hex digits>"}` and held under its
/// [`deny_key`](crate::bank::BankToken::deny_key) (or `{"media": "bank", "id": key}`); a bank range
/// means nothing (keys are hashes) and is refused. Built in code, an inverted range means
/// the ids between its two ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "EntryJson")]
pub struct Entry {
    /// Card numbers, QR accounts and token serials are separate number spaces.
    pub media: Media,
    /// The lowest id covered.
    pub first: u64,
    /// The highest id covered (inclusive), equal to `first` for a single id.
    pub last: u64,
}

/// The accepted JSON forms of an [`Entry`], validated into one.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryJson {
    media: Media,
    /// A single id (then neither `first` nor `last`).
    id: Option<u64>,
    /// The lowest id of a range.
    first: Option<u64>,
    /// The highest id of a range (inclusive; default `first`).
    last: Option<u64>,
    /// A bank payment token (medium `bank` only, alone).
    token: Option<crate::bank::BankToken>,
}

/// An entry's schema is that of the JSON it is read from ([`EntryJson`]): `{media, id}` or
/// `{media, first, last?}`, nothing else (the only form the controller's API takes).
#[cfg(feature = "schema")]
impl utoipa::PartialSchema for Entry {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{
            AdditionalProperties, KnownFormat, ObjectBuilder, OneOfBuilder, SchemaFormat, SchemaType, Type,
        };
        use utoipa::openapi::Ref;
        let id = |nullable: bool| {
            let t = if nullable {
                SchemaType::from_iter([Type::Integer, Type::Null])
            } else {
                Type::Integer.into()
            };
            ObjectBuilder::new()
                .schema_type(t)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
                .minimum(Some(0))
        };
        let null = || ObjectBuilder::new().schema_type(Type::Null);
        let shape = |description: &str| {
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .description(Some(description))
                .property("media", Ref::from_schema_name("Media"))
                .required("media")
                .additional_properties(Some(AdditionalProperties::FreeForm(false)))
        };
        OneOfBuilder::new()
            .description(Some("A blacklisted id, or an inclusive range of ids, of one medium."))
            .item(
                shape("One id.")
                    .property("id", id(false))
                    .property("first", null())
                    .property("last", null())
                    .required("id"),
            )
            .item(
                shape("A range `first..=last` (`last` defaults to `first`).")
                    .property("id", null())
                    .property("first", id(false))
                    .property("last", id(true))
                    .required("first"),
            )
            .item(
                shape("A denied bank payment token (medium `bank`), held under its first 8 bytes.")
                    .property(
                        "token",
                        ObjectBuilder::new().schema_type(Type::String).pattern(Some("^[0-9a-fA-F]{64}$")),
                    )
                    .required("token"),
            )
            .into()
    }
}

#[cfg(feature = "schema")]
impl utoipa::ToSchema for Entry {
    fn name() -> std::borrow::Cow<'static, str> {
        "BlacklistEntry".into()
    }

    fn schemas(schemas: &mut Vec<(String, utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>)>) {
        schemas.push((
            <Media as utoipa::ToSchema>::name().into_owned(),
            <Media as utoipa::PartialSchema>::schema(),
        ));
    }
}

impl TryFrom<EntryJson> for Entry {
    type Error = BlacklistError;

    fn try_from(j: EntryJson) -> Result<Entry, BlacklistError> {
        let bank = j.media == Media::Bank;
        match (j.id, j.first, j.last, j.token) {
            (None, None, None, Some(token)) if bank => Ok(Entry::single(j.media, token.deny_key())),
            (Some(id), None, None, None) => Ok(Entry::single(j.media, id)),
            (None, Some(first), last, None) if !bank || last.is_none_or(|l| l == first) => {
                Entry::range(j.media, first, last.unwrap_or(first))
            }
            _ => Err(BlacklistError::EntryShape { media: j.media }),
        }
    }
}

impl Entry {
    /// A single id.
    pub fn single(media: Media, id: u64) -> Entry {
        Entry { media, first: id, last: id }
    }

    /// An inclusive range, refused if inverted.
    pub fn range(media: Media, first: u64, last: u64) -> Result<Entry, BlacklistError> {
        if first > last {
            return Err(BlacklistError::InvertedRange { media, first, last });
        }
        Ok(Entry { media, first, last })
    }

    /// The `(low, high)` ends, whichever way round the fields were written.
    pub fn bounds(&self) -> (u64, u64) {
        (self.first.min(self.last), self.first.max(self.last))
    }

    /// How many ids the entry covers (saturating at `u64::MAX` for the whole number space).
    pub fn id_count(&self) -> u64 {
        let (lo, hi) = self.bounds();
        (hi - lo).saturating_add(1)
    }
}

/// Everything that can be wrong with a delta, an entry or an encoded list.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BlacklistError {
    #[error(
        "blacklist delta starts at version {from}, but the list holds version {held}: a delta is missing"
    )]
    DeltaGap { held: u64, from: u64 },
    #[error("blacklist delta starts at version {from}, but the list already holds version {held}: stale or out of order")]
    DeltaStale { held: u64, from: u64 },
    #[error("blacklist delta goes from version {from} to version {to}, which is not forward")]
    DeltaNotForward { from: u64, to: u64 },
    #[error("{} blacklist range {first}..={last} is inverted", media.as_str())]
    InvertedRange { media: Media, first: u64, last: u64 },
    #[error("{} blacklist entry must have either `id` or `first` (and optionally `last`; a bank entry `token` or `id`, no range)", media.as_str())]
    EntryShape { media: Media },
    #[error("encoded blacklist starts with 0x{found:02x}, expected 0x{expected:02x}")]
    BadMagic { expected: u8, found: u8 },
    #[error("encoded blacklist has format {found}, this build reads formats {FORMAT} and {FORMAT_BANK}")]
    UnsupportedFormat { found: u8 },
    #[error("encoded blacklist ends in the middle of {field}")]
    Truncated { field: &'static str },
    #[error("encoded blacklist has an overlong varint in {field}")]
    OverlongVarint { field: &'static str },
    #[error("encoded blacklist claims {count} {field} for {} in {section}, more than the {remaining} bytes left", media.as_str())]
    CountTooLarge { section: &'static str, media: Media, field: &'static str, count: u64, remaining: usize },
    #[error("encoded blacklist {field} for {} in {section} overflows 64 bits", media.as_str())]
    IdOverflow { section: &'static str, media: Media, field: &'static str },
    #[error("encoded blacklist range at {} id {first} in {section} covers one id: it must be a single", media.as_str())]
    RangeTooShort { section: &'static str, media: Media, first: u64 },
    #[error("encoded blacklist {} id {id} in {section} overlaps, touches or is out of order with the entry before it", media.as_str())]
    NotCanonical { section: &'static str, media: Media, id: u64 },
    #[error("encoded blacklist has {count} bytes after its end")]
    TrailingBytes { count: usize },
    #[error("encoded blacklist has the bank format but no bank ids: it must be format {FORMAT}")]
    BankFormatWithoutBank,
}

impl BlacklistError {
    /// A stable snake_case name, for `params/ack` reasons and metric labels.
    pub fn code(&self) -> &'static str {
        match self {
            BlacklistError::DeltaGap { .. } => "blacklist_delta_gap",
            BlacklistError::DeltaStale { .. } => "blacklist_delta_stale",
            BlacklistError::DeltaNotForward { .. } => "blacklist_delta_not_forward",
            BlacklistError::InvertedRange { .. } => "blacklist_inverted_range",
            BlacklistError::EntryShape { .. } => "blacklist_entry_shape",
            BlacklistError::BadMagic { .. } => "blacklist_bad_magic",
            BlacklistError::UnsupportedFormat { .. } => "blacklist_unsupported_format",
            BlacklistError::Truncated { .. } => "blacklist_truncated",
            BlacklistError::OverlongVarint { .. } => "blacklist_overlong_varint",
            BlacklistError::CountTooLarge { .. } => "blacklist_count_too_large",
            BlacklistError::IdOverflow { .. } => "blacklist_id_overflow",
            BlacklistError::RangeTooShort { .. } => "blacklist_range_too_short",
            BlacklistError::NotCanonical { .. } => "blacklist_not_canonical",
            BlacklistError::TrailingBytes { .. } => "blacklist_trailing_bytes",
            BlacklistError::BankFormatWithoutBank => "blacklist_not_canonical",
        }
    }
}

/// How many items one entry of a sparse index stands for. The index of 1,000,000 singles is then
/// 250 KB, which stays in cache, and a lookup touches only one 256-byte block of the big vector.
const BLOCK: usize = 32;

/// [`MediaList::changed`] patches near the changes when the list has this many times more items.
const PATCH_RATIO: usize = 256;

/// The ids of one medium, in canonical form (see the module documentation).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct MediaList {
    /// Ids blacklisted one by one, strictly increasing, none next to another single or a range.
    singles: Vec<u64>,
    /// Inclusive ranges of at least two ids, increasing, neither overlapping nor touching.
    ranges: Vec<(u64, u64)>,
    /// Every [`BLOCK`]th single, so a lookup bisects a small, cached vector first.
    singles_index: Vec<u64>,
    /// The start of every [`BLOCK`]th range, likewise.
    ranges_index: Vec<u64>,
}

/// The block of `items` that holds the last item whose key is at or below `id`, if any.
fn block_of<'a, T>(items: &'a [T], index: &[u64], id: u64) -> &'a [T] {
    let Some(k) = index.partition_point(|&first| first <= id).checked_sub(1) else {
        return &[];
    };
    let start = k.saturating_mul(BLOCK);
    items.get(start..items.len().min(start.saturating_add(BLOCK))).unwrap_or(&[])
}

impl MediaList {
    fn is_empty(&self) -> bool {
        self.singles.is_empty() && self.ranges.is_empty()
    }

    /// A list from canonical singles and ranges, with its indexes built.
    fn new(mut singles: Vec<u64>, mut ranges: Vec<(u64, u64)>) -> MediaList {
        singles.shrink_to_fit();
        ranges.shrink_to_fit();
        let singles_index = singles.iter().step_by(BLOCK).copied().collect();
        let ranges_index = ranges.iter().step_by(BLOCK).map(|&(first, _)| first).collect();
        MediaList { singles, ranges, singles_index, ranges_index }
    }

    fn contains(&self, id: u64) -> bool {
        if block_of(&self.singles, &self.singles_index, id).binary_search(&id).is_ok() {
            return true;
        }
        // The ranges starting at or below `id`; only the last of them can cover it.
        let block = block_of(&self.ranges, &self.ranges_index, id);
        let after = block.partition_point(|&(first, _)| first <= id);
        after.checked_sub(1).and_then(|i| block.get(i)).is_some_and(|&(_, last)| id <= last)
    }

    /// Every single and range as `(first, last)`, in increasing order.
    fn intervals(
        &self,
    ) -> MergeByStart<impl Iterator<Item = (u64, u64)> + '_, impl Iterator<Item = (u64, u64)> + '_> {
        MergeByStart::new(self.singles.iter().map(|&s| (s, s)), self.ranges.iter().copied())
    }

    fn id_count(&self) -> u64 {
        let in_ranges =
            self.ranges.iter().fold(0u64, |n, &(f, l)| n.saturating_add((l - f).saturating_add(1)));
        in_ranges.saturating_add(self.singles.len() as u64)
    }

    /// This list with `remove` taken out and then `add` put in (both sorted and merged, as
    /// [`normalize`] makes them): [`MediaList::patched`] for a few changes (a delta on a large
    /// list, measured 1.1k changes on 1M items about a quarter faster), [`MediaList::merged`]
    /// for many (deltas folded at start-up: one window per change costs more than one merge).
    fn changed(&self, add: &[(u64, u64)], remove: &[(u64, u64)]) -> MediaList {
        let items = self.singles.len() + self.ranges.len();
        if (add.len() + remove.len()).saturating_mul(PATCH_RATIO) < items {
            self.patched(add, remove)
        } else {
            self.merged(add, remove)
        }
    }

    /// [`MediaList::changed`] in one merge over every item.
    fn merged(&self, add: &[(u64, u64)], remove: &[(u64, u64)]) -> MediaList {
        let mut b = Builder::with_capacity(
            self.singles.len() + add.len() + 2 * remove.len(),
            self.ranges.len() + add.len() + remove.len(),
        );
        for iv in MergeByStart::new(Subtract::new(self.intervals(), remove), add.iter().copied()) {
            b.push(iv);
        }
        b.finish()
    }

    /// What [`MediaList::merged`] makes, touching only the items near a change: the ids a change
    /// covers, widened by one each side (an added id may join a neighbour), make windows; the
    /// items between windows are copied in bulk, the items of a window merged with its changes.
    /// A window is widened to the whole of every range it meets, so its output touches nothing
    /// outside it, and the canonical form holds across windows.
    fn patched(&self, add: &[(u64, u64)], remove: &[(u64, u64)]) -> MediaList {
        let widened = add.iter().chain(remove).map(|&(f, l)| (f.saturating_sub(1), l.saturating_add(1)));
        let windows = normalize(widened.collect());
        let (s, r) = (&self.singles, &self.ranges);
        let mut singles = Vec::with_capacity(s.len() + add.len() + 2 * remove.len());
        let mut ranges = Vec::with_capacity(r.len() + add.len() + remove.len());
        let (mut si, mut ri) = (0usize, 0usize);
        let mut w = windows.iter().copied().peekable();
        while let Some((mut lo, mut hi)) = w.next() {
            // The first range reaching into the window, and every range it meets, widen it;
            // a widened window may reach the next one, which then joins it.
            let first_range = ri + r[ri..].partition_point(|&(_, last)| last < lo);
            let mut end_range = first_range;
            if let Some(&(f, _)) = r.get(first_range).filter(|&&(f, _)| f <= hi) {
                lo = lo.min(f);
            }
            loop {
                while let Some(&(_, l)) = r.get(end_range).filter(|&&(f, _)| f <= hi) {
                    hi = hi.max(l);
                    end_range += 1;
                }
                match w.peek() {
                    Some(&(next_lo, next_hi)) if next_lo <= hi.saturating_add(1) => {
                        hi = hi.max(next_hi);
                        w.next();
                    }
                    _ => break,
                }
            }
            let first_single = si + s[si..].partition_point(|&id| id < lo);
            let end_single = first_single + s[first_single..].partition_point(|&id| id <= hi);
            singles.extend_from_slice(&s[si..first_single]);
            ranges.extend_from_slice(&r[ri..first_range]);
            let items = MergeByStart::new(
                s[first_single..end_single].iter().map(|&id| (id, id)),
                r[first_range..end_range].iter().copied(),
            );
            let cut_from = remove.partition_point(|&(_, l)| l < lo);
            let cut_to = remove.partition_point(|&(f, _)| f <= hi);
            let add_from = add.partition_point(|&(_, l)| l < lo);
            let add_to = add.partition_point(|&(f, _)| f <= hi);
            let mut b = Builder { singles, ranges, pending: None };
            let kept = Subtract::new(items, &remove[cut_from..cut_to.max(cut_from)]);
            for iv in MergeByStart::new(kept, add[add_from..add_to.max(add_from)].iter().copied()) {
                b.push(iv);
            }
            (singles, ranges) = b.into_parts();
            (si, ri) = (end_single, end_range);
        }
        singles.extend_from_slice(&s[si..]);
        ranges.extend_from_slice(&r[ri..]);
        MediaList::new(singles, ranges)
    }

    fn heap_bytes(&self) -> usize {
        (self.singles.capacity() + self.singles_index.capacity() + self.ranges_index.capacity())
            * std::mem::size_of::<u64>()
            + self.ranges.capacity() * std::mem::size_of::<(u64, u64)>()
    }
}

/// Builds a canonical [`MediaList`] from intervals pushed in non-decreasing order of start,
/// merging the ones that overlap or touch.
#[derive(Default)]
struct Builder {
    /// Finished singles, in order.
    singles: Vec<u64>,
    /// Finished ranges, in order.
    ranges: Vec<(u64, u64)>,
    /// The interval still growing: the next push may extend it.
    pending: Option<(u64, u64)>,
}

impl Builder {
    fn with_capacity(singles: usize, ranges: usize) -> Builder {
        Builder { singles: Vec::with_capacity(singles), ranges: Vec::with_capacity(ranges), pending: None }
    }

    fn push(&mut self, (first, last): (u64, u64)) {
        match self.pending {
            Some((pf, pl)) if first <= pl.saturating_add(1) => self.pending = Some((pf, pl.max(last))),
            Some(done) => {
                self.emit(done);
                self.pending = Some((first, last));
            }
            None => self.pending = Some((first, last)),
        }
    }

    fn emit(&mut self, (first, last): (u64, u64)) {
        if first == last {
            self.singles.push(first);
        } else {
            self.ranges.push((first, last));
        }
    }

    fn finish(self) -> MediaList {
        let (singles, ranges) = self.into_parts();
        MediaList::new(singles, ranges)
    }

    /// The finished singles and ranges, without building indexes.
    fn into_parts(mut self) -> (Vec<u64>, Vec<(u64, u64)>) {
        if let Some(done) = self.pending.take() {
            self.emit(done);
        }
        (self.singles, self.ranges)
    }
}

/// Sorts intervals and merges the ones that overlap or touch, in place.
fn normalize(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (first, last) in v {
        match merged.last_mut() {
            Some(prev) if first <= prev.1.saturating_add(1) => prev.1 = prev.1.max(last),
            _ => merged.push((first, last)),
        }
    }
    merged
}

/// Merges two interval streams, each sorted by start, into one sorted by start.
struct MergeByStart<A: Iterator<Item = (u64, u64)>, B: Iterator<Item = (u64, u64)>> {
    a: Peekable<A>,
    b: Peekable<B>,
}

impl<A: Iterator<Item = (u64, u64)>, B: Iterator<Item = (u64, u64)>> MergeByStart<A, B> {
    fn new(a: A, b: B) -> Self {
        MergeByStart { a: a.peekable(), b: b.peekable() }
    }
}

impl<A: Iterator<Item = (u64, u64)>, B: Iterator<Item = (u64, u64)>> Iterator for MergeByStart<A, B> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        match (self.a.peek(), self.b.peek()) {
            (Some(x), Some(y)) if y.0 < x.0 => self.b.next(),
            (Some(_), _) => self.a.next(),
            (None, _) => self.b.next(),
        }
    }
}

/// The intervals of `inner` (sorted, disjoint) minus the intervals of `cut` (sorted, merged).
struct Subtract<'a, I: Iterator<Item = (u64, u64)>> {
    inner: I,
    cut: &'a [(u64, u64)],
    /// The remainder of an interval of `inner` that a cut split.
    rest: Option<(u64, u64)>,
}

impl<'a, I: Iterator<Item = (u64, u64)>> Subtract<'a, I> {
    fn new(inner: I, cut: &'a [(u64, u64)]) -> Self {
        Subtract { inner, cut, rest: None }
    }
}

impl<I: Iterator<Item = (u64, u64)>> Iterator for Subtract<'_, I> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        loop {
            let (first, last) = match self.rest.take() {
                Some(r) => r,
                None => self.inner.next()?,
            };
            // Cuts ending before this interval cannot touch it or any later one.
            while let Some((&(_, cut_last), later)) = self.cut.split_first() {
                if cut_last < first {
                    self.cut = later;
                } else {
                    break;
                }
            }
            let Some(&(cut_first, cut_last)) = self.cut.first() else {
                return Some((first, last));
            };
            if cut_first > last {
                return Some((first, last));
            }
            // The cut overlaps: keep what lies after it for the next round (cut_last < last, so
            // the +1 cannot overflow), and return what lies before it (cut_first > first >= 0).
            if cut_last < last {
                self.rest = Some((cut_last + 1, last));
            }
            if cut_first > first {
                return Some((first, cut_first - 1));
            }
        }
    }
}

/// How many ids the intervals of `new` cover that those of `old` do not: `|new| - |new ∩ old|`.
///
/// Both streams must be sorted by start and disjoint (a [`MediaList`]'s intervals, normalized
/// entries). One merge over the two: each interval is visited once and a range's coverage is
/// counted arithmetically, so a range of billions of ids costs what a single id costs. The sum is
/// a `u128`: three media of `2^64` ids each do not fit in a `u64`.
fn count_outside(new: impl Iterator<Item = (u64, u64)>, old: impl Iterator<Item = (u64, u64)>) -> u128 {
    let mut old = old.peekable();
    let mut outside: u128 = 0;
    for (first, last) in new {
        let mut covered: u128 = 0;
        while let Some(&(old_first, old_last)) = old.peek() {
            if old_last < first {
                // Ends before this interval, so before every later one too.
                old.next();
                continue;
            }
            if old_first > last {
                break;
            }
            covered += u128::from(old_last.min(last) - old_first.max(first)) + 1;
            if old_last > last {
                // It reaches past this interval and may cover part of the next one.
                break;
            }
            old.next();
        }
        outside += u128::from(last - first) + 1 - covered;
    }
    outside
}

/// A `u128` id count as a `u64`, saturating (only the whole number space of several media overflows).
fn saturate(n: u128) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Index of a medium's list in [`Blacklist::lists`].
fn slot(media: Media) -> usize {
    match media {
        Media::Svc => 0,
        Media::Qr => 1,
        Media::Token => 2,
        Media::Bank => 3,
    }
}

/// Splits entries into normalized intervals per medium (indexed by [`slot`]).
fn intervals_by_media<'a>(entries: impl IntoIterator<Item = &'a Entry>) -> [Vec<(u64, u64)>; MEDIA_SLOTS] {
    let mut by_media: [Vec<(u64, u64)>; MEDIA_SLOTS] = Default::default();
    for e in entries {
        by_media[slot(e.media)].push(e.bounds());
    }
    by_media.map(normalize)
}

/// A blacklist of one version: what a gate consults on every tap.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Blacklist {
    /// The parameter version this list is, so deltas can be checked against it (0 = none yet).
    version: u64,
    /// The ids of each medium, indexed by [`slot`].
    lists: [MediaList; MEDIA_SLOTS],
}

impl fmt::Debug for Blacklist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Blacklist");
        d.field("version", &self.version);
        for m in Media::ALL {
            let l = &self.lists[slot(m)];
            d.field(m.as_str(), &format_args!("{} singles, {} ranges", l.singles.len(), l.ranges.len()));
        }
        d.finish()
    }
}

impl Blacklist {
    /// Version 0, holding nothing: a gate that has never received a blacklist.
    pub fn empty() -> Blacklist {
        Blacklist::default()
    }

    /// A list of the given version from entries in any order, with duplicates and overlaps.
    pub fn from_entries(version: u64, entries: impl IntoIterator<Item = Entry>) -> Blacklist {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let by_media = intervals_by_media(&entries);
        drop(entries);
        let lists = by_media.map(|ivs| {
            let mut b = Builder::default();
            for iv in ivs {
                b.push(iv);
            }
            b.finish()
        });
        Blacklist { version, lists }
    }

    /// Whether `id` of `media` is blacklisted. Two bisections, no allocation.
    pub fn contains(&self, media: Media, id: u64) -> bool {
        self.lists[slot(media)].contains(id)
    }

    /// The parameter version this list is.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// How many ids the list covers (ranges count every id in them; saturating).
    pub fn entry_count(&self) -> u64 {
        self.lists.iter().fold(0u64, |n, l| n.saturating_add(l.id_count()))
    }

    /// How many singles and ranges the list holds (its size on the heap, not in ids).
    pub fn item_count(&self) -> usize {
        self.lists.iter().map(|l| l.singles.len() + l.ranges.len()).sum()
    }

    /// Approximate bytes held on the heap (the vectors' capacities).
    pub fn heap_bytes(&self) -> usize {
        self.lists.iter().map(MediaList::heap_bytes).sum()
    }

    /// Every single and range, by medium then by id, as canonical entries.
    pub fn entries(&self) -> impl Iterator<Item = Entry> + '_ {
        Media::ALL.into_iter().flat_map(move |m| {
            self.lists[slot(m)].intervals().map(move |(first, last)| Entry { media: m, first, last })
        })
    }

    /// Applies a delta made for exactly this version. On error the list is unchanged.
    ///
    /// Removals are applied before additions, so an id both removed and added stays blacklisted;
    /// removing part of a range splits it.
    pub fn apply_delta(&mut self, d: &BlacklistDelta) -> Result<(), BlacklistError> {
        let rebuilt = self.rebuilt_by(d)?;
        // Nothing below can fail: the change is all or nothing.
        for (list, new) in self.lists.iter_mut().zip(rebuilt) {
            if let Some(new) = new {
                *list = new;
            }
        }
        self.version = d.to_version;
        Ok(())
    }

    /// The list this one becomes with `d` applied ([`Blacklist::apply_delta`]), built from this
    /// one without copying it first: a gate keeps deciding with this list while the next is made.
    pub fn with_delta(&self, d: &BlacklistDelta) -> Result<Blacklist, BlacklistError> {
        let rebuilt = self.rebuilt_by(d)?;
        let mut lists: [MediaList; MEDIA_SLOTS] = Default::default();
        for ((out, old), new) in lists.iter_mut().zip(&self.lists).zip(rebuilt) {
            *out = new.unwrap_or_else(|| old.clone());
        }
        Ok(Blacklist { version: d.to_version, lists })
    }

    /// The media lists `d` changes, rebuilt with it applied (`None`: unchanged).
    fn rebuilt_by(&self, d: &BlacklistDelta) -> Result<[Option<MediaList>; MEDIA_SLOTS], BlacklistError> {
        d.check_applies_to(self.version)?;
        let add = intervals_by_media(&d.add);
        let remove = intervals_by_media(&d.remove);
        let mut rebuilt: [Option<MediaList>; MEDIA_SLOTS] = Default::default();
        for i in 0..MEDIA_SLOTS {
            if add[i].is_empty() && remove[i].is_empty() {
                continue;
            }
            rebuilt[i] = Some(self.lists[i].changed(&add[i], &remove[i]));
        }
        Ok(rebuilt)
    }

    /// How many ids `newer` blacklists that this list does not: `|newer \ self|` over `(media, id)`,
    /// singles and ranges alike (a range adds the ids it covers that this list did not), for the
    /// mass-insertion guard of SPEC §4. Swapping 250,000 ids for 250,000 others adds 250,000,
    /// whatever the two lists' sizes. One merge over both sorted lists (no per-id work, no
    /// allocation): a million entries each take milliseconds. Saturating.
    pub fn ids_added_by(&self, newer: &Blacklist) -> u64 {
        let outside: u128 = Media::ALL
            .into_iter()
            .map(|m| count_outside(newer.lists[slot(m)].intervals(), self.lists[slot(m)].intervals()))
            .sum();
        saturate(outside)
    }

    /// The delta that turns this list into `newer` (for a controller publishing both).
    pub fn delta_to(&self, newer: &Blacklist) -> BlacklistDelta {
        let mut add = Vec::new();
        let mut remove = Vec::new();
        for m in Media::ALL {
            let (old, new) = (&self.lists[slot(m)], &newer.lists[slot(m)]);
            let old_ivs: Vec<(u64, u64)> = old.intervals().collect();
            let new_ivs: Vec<(u64, u64)> = new.intervals().collect();
            let entry = |(first, last)| Entry { media: m, first, last };
            add.extend(Subtract::new(new_ivs.iter().copied(), &old_ivs).map(entry));
            remove.extend(Subtract::new(old_ivs.iter().copied(), &new_ivs).map(entry));
        }
        BlacklistDelta { from_version: self.version, to_version: newer.version, add, remove }
    }

    /// The compact package body: magic, format, version, then per medium (svc, qr, token, and bank
    /// in [`FORMAT_BANK`]) the singles and the ranges as varint gaps (see [`encode_section`]).
    pub fn encode(&self) -> Vec<u8> {
        let items = self.item_count();
        let mut out = Vec::with_capacity(items * 2 + 16);
        let format = if self.lists[slot(Media::Bank)].is_empty() { FORMAT } else { FORMAT_BANK };
        out.push(FULL_MAGIC);
        out.push(format);
        varint::put_u64(&mut out, self.version);
        for &m in media_of(format) {
            encode_section(&mut out, &self.lists[slot(m)]);
        }
        out
    }

    /// Reads [`Blacklist::encode`]'s bytes, refusing anything that is not exactly canonical.
    pub fn decode(bytes: &[u8]) -> Result<Blacklist, BlacklistError> {
        let mut r = Reader::new(bytes);
        let format = read_header(&mut r, FULL_MAGIC)?;
        let version = read_u64(&mut r, "version")?;
        let mut lists: [MediaList; MEDIA_SLOTS] = Default::default();
        for &m in media_of(format) {
            lists[slot(m)] = decode_section(&mut r, "list", m)?;
        }
        expect_end(&r)?;
        if format == FORMAT_BANK && lists[slot(Media::Bank)].is_empty() {
            return Err(BlacklistError::BankFormatWithoutBank);
        }
        Ok(Blacklist { version, lists })
    }
}

/// A change from one blacklist version to the next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlacklistDelta {
    /// The version this delta must be applied to, and only to.
    pub from_version: u64,
    /// The version the list has after it.
    pub to_version: u64,
    /// Ids and ranges to blacklist.
    pub add: Vec<Entry>,
    /// Ids and ranges to clear (may split a range).
    pub remove: Vec<Entry>,
}

impl BlacklistDelta {
    /// Whether this delta applies to a list holding `held`: exactly from it, and forward.
    pub fn check_applies_to(&self, held: u64) -> Result<(), BlacklistError> {
        let (from, to) = (self.from_version, self.to_version);
        if to <= from {
            return Err(BlacklistError::DeltaNotForward { from, to });
        }
        if from > held {
            return Err(BlacklistError::DeltaGap { held, from });
        }
        if from < held {
            return Err(BlacklistError::DeltaStale { held, from });
        }
        Ok(())
    }

    /// The one delta that does what this delta and then `next` do: applying it equals applying
    /// both in turn. `next` must start where this one ends (the same check as on a list holding
    /// this delta's `to_version`). With `(A, R)` applied as `(L − R) ∪ A`, the two make
    /// `(L − (R1 ∪ R2)) ∪ ((A1 − R2) ∪ A2)`. A gate folds its stored deltas into one this way at
    /// start-up, so it merges its base list once, however many deltas it holds.
    pub fn then(&self, next: &BlacklistDelta) -> Result<BlacklistDelta, BlacklistError> {
        next.check_applies_to(self.to_version)?;
        let (a1, r1) = (intervals_by_media(&self.add), intervals_by_media(&self.remove));
        let (a2, r2) = (intervals_by_media(&next.add), intervals_by_media(&next.remove));
        let mut add = Vec::new();
        let mut remove = Vec::new();
        for m in Media::ALL {
            let i = slot(m);
            let entry = |(first, last)| Entry { media: m, first, last };
            let kept: Vec<(u64, u64)> = Subtract::new(a1[i].iter().copied(), &r2[i]).collect();
            add.extend(
                normalize(kept.into_iter().chain(a2[i].iter().copied()).collect()).into_iter().map(entry),
            );
            remove.extend(normalize(r1[i].iter().chain(&r2[i]).copied().collect()).into_iter().map(entry));
        }
        Ok(BlacklistDelta { from_version: self.from_version, to_version: next.to_version, add, remove })
    }

    /// The ids this delta adds (before merging with the list; saturating). The mass-insertion
    /// guard counts only the new ones: [`BlacklistDelta::ids_added_to`].
    pub fn added_count(&self) -> u64 {
        intervals_by_media(&self.add)
            .iter()
            .flatten()
            .fold(0u64, |n, &(f, l)| n.saturating_add((l - f).saturating_add(1)))
    }

    /// How many ids applying this delta to `held` blacklists that `held` did not list: its
    /// additions minus the ids `held` already holds (an id the delta both removes and adds stays
    /// listed, so it is not new). The mass-insertion guard's count for a delta (SPEC §4); whether
    /// the delta applies to `held`'s version is checked by [`BlacklistDelta::check_applies_to`],
    /// not here. Saturating.
    pub fn ids_added_to(&self, held: &Blacklist) -> u64 {
        let add = intervals_by_media(&self.add);
        let outside: u128 = Media::ALL
            .into_iter()
            .map(|m| count_outside(add[slot(m)].iter().copied(), held.lists[slot(m)].intervals()))
            .sum();
        saturate(outside)
    }

    /// The ids this delta removes (saturating).
    pub fn removed_count(&self) -> u64 {
        intervals_by_media(&self.remove)
            .iter()
            .flatten()
            .fold(0u64, |n, &(f, l)| n.saturating_add((l - f).saturating_add(1)))
    }

    /// The same delta with `add` and `remove` each sorted by medium and id, merged and split into
    /// canonical singles and ranges: what [`BlacklistDelta::decode`] returns.
    pub fn normalized(&self) -> BlacklistDelta {
        let canon = |entries: &[Entry]| -> Vec<Entry> {
            let lists = canonical_lists(entries);
            Media::ALL
                .into_iter()
                .flat_map(|m| {
                    lists[slot(m)]
                        .intervals()
                        .map(move |(first, last)| Entry { media: m, first, last })
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        BlacklistDelta {
            from_version: self.from_version,
            to_version: self.to_version,
            add: canon(&self.add),
            remove: canon(&self.remove),
        }
    }

    /// The compact package body: magic, format, the two versions, then the additions and the
    /// removals, each per medium as in [`Blacklist::encode`].
    pub fn encode(&self) -> Vec<u8> {
        let add = canonical_lists(&self.add);
        let remove = canonical_lists(&self.remove);
        let mut out = Vec::with_capacity((self.add.len() + self.remove.len()) * 3 + 24);
        let bank = slot(Media::Bank);
        let format = if add[bank].is_empty() && remove[bank].is_empty() { FORMAT } else { FORMAT_BANK };
        out.push(DELTA_MAGIC);
        out.push(format);
        varint::put_u64(&mut out, self.from_version);
        varint::put_u64(&mut out, self.to_version);
        for lists in [&add, &remove] {
            for &m in media_of(format) {
                encode_section(&mut out, &lists[slot(m)]);
            }
        }
        out
    }

    /// Reads [`BlacklistDelta::encode`]'s bytes into a [normalized](BlacklistDelta::normalized)
    /// delta. Versions are checked when the delta is applied, not here.
    pub fn decode(bytes: &[u8]) -> Result<BlacklistDelta, BlacklistError> {
        let mut r = Reader::new(bytes);
        let format = read_header(&mut r, DELTA_MAGIC)?;
        let from_version = read_u64(&mut r, "from_version")?;
        let to_version = read_u64(&mut r, "to_version")?;
        let mut add = Vec::new();
        let mut remove = Vec::new();
        for (section, out) in [("add", &mut add), ("remove", &mut remove)] {
            for &m in media_of(format) {
                let list = decode_section(&mut r, section, m)?;
                out.extend(list.intervals().map(|(first, last)| Entry { media: m, first, last }));
            }
        }
        expect_end(&r)?;
        if format == FORMAT_BANK && !add.iter().chain(&remove).any(|e| e.media == Media::Bank) {
            return Err(BlacklistError::BankFormatWithoutBank);
        }
        Ok(BlacklistDelta { from_version, to_version, add, remove })
    }
}

/// Entries as canonical per-medium lists (indexed by [`slot`]).
fn canonical_lists(entries: &[Entry]) -> [MediaList; MEDIA_SLOTS] {
    intervals_by_media(entries).map(|ivs| {
        let mut b = Builder::default();
        for iv in ivs {
            b.push(iv);
        }
        b.finish()
    })
}

/// One medium's section: `n_singles`, the first single, then each next single as its gap from
/// the previous one (≥ 2); `n_ranges`, then each range as `(gap, last - first)` where the gap of
/// the first range is its start and the others' the distance from the previous range's end (≥ 2).
fn encode_section(out: &mut Vec<u8>, list: &MediaList) {
    varint::put_u64(out, list.singles.len() as u64);
    let mut prev = 0;
    for &id in &list.singles {
        varint::put_u64(out, id - prev);
        prev = id;
    }
    varint::put_u64(out, list.ranges.len() as u64);
    let mut prev_last = 0;
    for &(first, last) in &list.ranges {
        varint::put_u64(out, first - prev_last);
        varint::put_u64(out, last - first);
        prev_last = last;
    }
}

fn decode_section(
    r: &mut Reader<'_>,
    section: &'static str,
    media: Media,
) -> Result<MediaList, BlacklistError> {
    let not_canonical = |id| BlacklistError::NotCanonical { section, media, id };
    let overflow = |field| BlacklistError::IdOverflow { section, media, field };

    // Every single takes at least one byte, so the count is bounded by the input left.
    let n = read_count(r, section, media, "singles", 1)?;
    // Grow as items decode: a hostile count is bounded by the input, but 8 bytes per input byte.
    let mut singles = Vec::with_capacity(n.min(1 << 16));
    let mut prev: Option<u64> = None;
    for _ in 0..n {
        let gap = read_u64(r, "single id")?;
        let id = match prev {
            None => gap,
            Some(p) => {
                let id = p.checked_add(gap).ok_or_else(|| overflow("single id"))?;
                if gap < 2 {
                    return Err(not_canonical(id));
                }
                id
            }
        };
        singles.push(id);
        prev = Some(id);
    }

    // Every range takes at least two bytes.
    let n = read_count(r, section, media, "ranges", 2)?;
    let mut ranges = Vec::with_capacity(n.min(1 << 16));
    let mut prev_last: Option<u64> = None;
    for _ in 0..n {
        let gap = read_u64(r, "range gap")?;
        let len = read_u64(r, "range length")?;
        let first = match prev_last {
            None => gap,
            Some(p) => {
                let first = p.checked_add(gap).ok_or_else(|| overflow("range start"))?;
                if gap < 2 {
                    return Err(not_canonical(first));
                }
                first
            }
        };
        let last = first.checked_add(len).ok_or_else(|| overflow("range end"))?;
        if len == 0 {
            return Err(BlacklistError::RangeTooShort { section, media, first });
        }
        ranges.push((first, last));
        prev_last = Some(last);
    }

    // Singles and ranges must not overlap or touch each other either.
    let list = MediaList::new(singles, ranges);
    let mut prev_end: Option<u64> = None;
    for (first, last) in list.intervals() {
        if let Some(p) = prev_end {
            if p.checked_add(1).is_none_or(|next| first <= next) {
                return Err(not_canonical(first));
            }
        }
        prev_end = Some(last);
    }
    Ok(list)
}

/// Reads the magic and the format, returning the format.
fn read_header(r: &mut Reader<'_>, expected: u8) -> Result<u8, BlacklistError> {
    let found = r.byte().map_err(|_| BlacklistError::Truncated { field: "magic" })?;
    if found != expected {
        return Err(BlacklistError::BadMagic { expected, found });
    }
    let format = r.byte().map_err(|_| BlacklistError::Truncated { field: "format" })?;
    if format != FORMAT && format != FORMAT_BANK {
        return Err(BlacklistError::UnsupportedFormat { found: format });
    }
    Ok(format)
}

fn read_u64(r: &mut Reader<'_>, field: &'static str) -> Result<u64, BlacklistError> {
    r.u64().map_err(|e| match e {
        VarintError::Truncated => BlacklistError::Truncated { field },
        VarintError::Overlong => BlacklistError::OverlongVarint { field },
    })
}

/// A count of items each taking at least `min_bytes`, refused if the input left cannot hold them.
fn read_count(
    r: &mut Reader<'_>,
    section: &'static str,
    media: Media,
    field: &'static str,
    min_bytes: usize,
) -> Result<usize, BlacklistError> {
    let count = read_u64(r, field)?;
    let remaining = r.remaining();
    match usize::try_from(count) {
        Ok(n) if n <= remaining / min_bytes => Ok(n),
        _ => Err(BlacklistError::CountTooLarge { section, media, field, count, remaining }),
    }
}

fn expect_end(r: &Reader<'_>) -> Result<(), BlacklistError> {
    match r.remaining() {
        0 => Ok(()),
        count => Err(BlacklistError::TrailingBytes { count }),
    }
}

/// A realistic blacklist for benchmarks and tests: `n` entries drawn, reproducibly from `seed`,
/// the way blocked cards really cluster.
///
/// Card numbers are issued in dense serial ranges per issuer, so the ids come from a few pools:
/// Mingzhu cards `3104_0000_0000_0000 + serial` (ordinary, 50 million serials; student and senior
/// cards in their own blocks of 10 million), phone-emulated cards (20 million), QR ride-code
/// accounts (30 million) and token serials (2 million). About one entry in a thousand is a range
/// of 2–200 consecutive numbers (a lost batch); the rest are single ids, spread evenly over their
/// pool. Entries are not sorted, and a few singles may touch each other (they merge into ranges).
pub fn realistic_sample(n: usize, seed: u64) -> Vec<Entry> {
    use rand::{Rng, SeedableRng};

    /// (medium, first number, serials issued, share of the singles in per cent)
    const POOLS: [(Media, u64, u64, usize); 6] = [
        (Media::Svc, 3104_0000_0000_0000, 50_000_000, 55),
        (Media::Svc, 3104_0100_0000_0000, 10_000_000, 8),
        (Media::Svc, 3104_0200_0000_0000, 10_000_000, 5),
        (Media::Svc, 3104_9000_0000_0000, 20_000_000, 20),
        (Media::Qr, 8600_0000_0000, 30_000_000, 10),
        (Media::Token, 1_000_000, 2_000_000, 2),
    ];

    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n_ranges = n / 1000;
    let n_singles = n - n_ranges;
    let mut out = Vec::with_capacity(n);
    let mut left = n_singles;
    for (i, &(media, base, span, share)) in POOLS.iter().enumerate() {
        let k = if i + 1 == POOLS.len() { left } else { (n_singles * share / 100).min(left) };
        left -= k;
        if k == 0 {
            continue;
        }
        // Uniform gaps averaging span / k spread the pool's singles over its serials.
        let max_gap = (2 * span / k as u64).saturating_sub(1).max(1);
        let mut id = base + rng.gen_range(0..max_gap);
        for _ in 0..k {
            out.push(Entry::single(media, id));
            id += rng.gen_range(1..=max_gap);
        }
    }
    for _ in 0..n_ranges {
        let (media, base, span, _) = POOLS[rng.gen_range(0..4)];
        let first = base + rng.gen_range(0..span);
        let last = first + rng.gen_range(1..200);
        out.push(Entry { media, first, last });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bank_ids_are_written_in_the_bank_format_and_every_list_without_them_keeps_format_1() {
        let cards = Blacklist::from_entries(
            3,
            [Entry::single(Media::Svc, 42), Entry::range(Media::Qr, 5, 9).unwrap()],
        );
        assert_eq!(cards.encode()[1], FORMAT);
        let tokens = crate::bank::sample_tokens(3, 1);
        let with_bank = Blacklist::from_entries(
            4,
            cards.entries().chain(tokens.iter().map(|t| Entry::single(Media::Bank, t.deny_key()))),
        );
        let bytes = with_bank.encode();
        assert_eq!(bytes[1], FORMAT_BANK);
        assert_eq!(Blacklist::decode(&bytes), Ok(with_bank.clone()));
        assert!(with_bank.contains(Media::Bank, tokens[2].deny_key()));
        assert!(!with_bank.contains(Media::Svc, tokens[2].deny_key()));
        // The bank format with an empty bank section is an alias of format 1: refused.
        let mut alias = cards.encode();
        alias[1] = FORMAT_BANK;
        alias.extend_from_slice(&[0, 0]);
        assert_eq!(Blacklist::decode(&alias), Err(BlacklistError::BankFormatWithoutBank));
        // A delta that adds a token is in the bank format and applies in place.
        let delta = cards.delta_to(&Blacklist::from_entries(4, with_bank.entries()));
        let encoded = delta.encode();
        assert_eq!(encoded[1], FORMAT_BANK);
        let mut applied = cards.clone();
        applied.apply_delta(&BlacklistDelta::decode(&encoded).unwrap()).unwrap();
        assert_eq!(applied, with_bank);
        // JSON: a token is held by its deny key; a bank range is refused.
        let json = format!(r#"{{"media":"bank","token":"{}"}}"#, tokens[0]);
        assert_eq!(
            serde_json::from_str::<Entry>(&json).unwrap(),
            Entry::single(Media::Bank, tokens[0].deny_key())
        );
        assert!(serde_json::from_str::<Entry>(r#"{"media":"bank","first":1,"last":9}"#).is_err());
        assert!(serde_json::from_str::<Entry>(r#"{"media":"svc","token":"00"}"#).is_err());
    }
    use proptest::prelude::*;

    fn svc(first: u64, last: u64) -> Entry {
        Entry { media: Media::Svc, first, last }
    }

    fn delta(from: u64, to: u64, add: Vec<Entry>, remove: Vec<Entry>) -> BlacklistDelta {
        BlacklistDelta { from_version: from, to_version: to, add, remove }
    }

    #[test]
    fn membership_holds_exactly_at_range_edges_and_per_medium() {
        let bl = Blacklist::from_entries(1, [svc(100, 200), svc(500, 500), Entry::single(Media::Qr, 150)]);
        for id in [100, 101, 199, 200, 500] {
            assert!(bl.contains(Media::Svc, id), "{id}");
        }
        for id in [0, 99, 201, 499, 501, u64::MAX] {
            assert!(!bl.contains(Media::Svc, id), "{id}");
        }
        assert!(bl.contains(Media::Qr, 150));
        assert!(!bl.contains(Media::Qr, 151));
        assert!(!bl.contains(Media::Token, 150));
        assert_eq!(bl.entry_count(), 103);
    }

    #[test]
    fn lookups_are_correct_across_index_block_boundaries() {
        // Singles at 10, 13, 16, ... and ranges [1_000_000 + 10k, +3] for k < 5000: many blocks each.
        let singles = (0..5000u64).map(|k| svc(10 + 3 * k, 10 + 3 * k));
        let ranges = (0..5000u64).map(|k| svc(1_000_000 + 10 * k, 1_000_000 + 10 * k + 3));
        let bl = Blacklist::from_entries(1, singles.chain(ranges));
        assert!(bl.lists[0].singles_index.len() > 100 && bl.lists[0].ranges_index.len() > 100);
        for id in 0..16_000u64 {
            let expect = (10..10 + 3 * 5000).contains(&id) && (id - 10) % 3 == 0;
            assert_eq!(bl.contains(Media::Svc, id), expect, "{id}");
        }
        for id in 999_990..1_050_010u64 {
            let expect = (1_000_000..1_050_000).contains(&id) && (id - 1_000_000) % 10 <= 3;
            assert_eq!(bl.contains(Media::Svc, id), expect, "{id}");
        }
    }

    #[test]
    fn ranges_reaching_the_ends_of_the_number_space_are_held() {
        let bl =
            Blacklist::from_entries(1, [svc(0, 3), svc(u64::MAX - 1, u64::MAX), svc(u64::MAX, u64::MAX)]);
        assert!(bl.contains(Media::Svc, 0));
        assert!(bl.contains(Media::Svc, u64::MAX));
        assert!(!bl.contains(Media::Svc, 4));
        assert_eq!(Blacklist::decode(&bl.encode()).unwrap(), bl);
        let all = Blacklist::from_entries(1, [svc(0, u64::MAX)]);
        assert_eq!(all.entry_count(), u64::MAX);
        assert!(all.contains(Media::Svc, 12345));
    }

    #[test]
    fn entries_are_normalised_into_canonical_singles_and_ranges() {
        let messy = [
            svc(10, 12),
            svc(11, 15),
            svc(16, 16),
            svc(20, 20),
            svc(21, 21),
            svc(30, 30),
            svc(30, 30),
            svc(9, 3),
        ];
        let bl = Blacklist::from_entries(7, messy);
        let entries: Vec<Entry> = bl.entries().collect();
        // 3..=9 (inverted in the input) touches 10..=16; 20 and 21 become a range; 30 stays single.
        assert_eq!(entries, vec![svc(3, 16), svc(20, 21), svc(30, 30)]);
        assert_eq!(bl.lists[0].singles, vec![30]);
        assert_eq!(bl.lists[0].ranges, vec![(3, 16), (20, 21)]);
        // The same ids in another order and shape give an equal list.
        let other = Blacklist::from_entries(7, [svc(30, 30), svc(21, 20), svc(3, 16)]);
        assert_eq!(other, bl);
        assert_eq!(other.encode(), bl.encode());
    }

    #[test]
    fn a_delta_with_a_gap_is_refused() {
        let mut bl = Blacklist::from_entries(5, [svc(1, 1)]);
        let err = bl.apply_delta(&delta(6, 7, vec![svc(2, 2)], vec![])).unwrap_err();
        assert_eq!(err, BlacklistError::DeltaGap { held: 5, from: 6 });
        assert_eq!(err.code(), "blacklist_delta_gap");
        assert_eq!(bl.version(), 5);
    }

    #[test]
    fn a_stale_or_replayed_delta_is_refused() {
        let mut bl = Blacklist::from_entries(5, [svc(1, 1)]);
        let d = delta(5, 6, vec![svc(2, 2)], vec![]);
        bl.apply_delta(&d).unwrap();
        assert_eq!(bl.apply_delta(&d).unwrap_err(), BlacklistError::DeltaStale { held: 6, from: 5 });
        assert_eq!(
            bl.apply_delta(&delta(3, 4, vec![], vec![])).unwrap_err(),
            BlacklistError::DeltaStale { held: 6, from: 3 }
        );
    }

    #[test]
    fn a_delta_that_does_not_move_forward_is_refused() {
        let mut bl = Blacklist::from_entries(5, []);
        for (from, to) in [(5, 5), (5, 4)] {
            assert_eq!(
                bl.apply_delta(&delta(from, to, vec![], vec![])).unwrap_err(),
                BlacklistError::DeltaNotForward { from, to }
            );
        }
    }

    #[test]
    fn removing_the_middle_of_a_range_splits_it() {
        let mut bl = Blacklist::from_entries(1, [svc(100, 199)]);
        bl.apply_delta(&delta(1, 2, vec![], vec![svc(150, 150), svc(101, 101), svc(190, 198)])).unwrap();
        assert!(bl.contains(Media::Svc, 100));
        assert!(!bl.contains(Media::Svc, 101));
        assert!(bl.contains(Media::Svc, 149));
        assert!(!bl.contains(Media::Svc, 150));
        assert!(bl.contains(Media::Svc, 189));
        assert!(!bl.contains(Media::Svc, 195));
        assert!(bl.contains(Media::Svc, 199));
        assert_eq!(
            bl.entries().collect::<Vec<_>>(),
            vec![svc(100, 100), svc(102, 149), svc(151, 189), svc(199, 199)]
        );
        assert_eq!(bl.version(), 2);
    }

    #[test]
    fn a_delta_adds_before_it_is_removed_from_nothing_and_merges_neighbours() {
        let mut bl = Blacklist::from_entries(1, [svc(10, 10), svc(12, 12)]);
        bl.apply_delta(&delta(1, 2, vec![svc(11, 11)], vec![svc(500, 600)])).unwrap();
        assert_eq!(bl.entries().collect::<Vec<_>>(), vec![svc(10, 12)]);
        // An id both removed and added in one delta stays blacklisted.
        bl.apply_delta(&delta(2, 3, vec![svc(11, 11)], vec![svc(11, 11)])).unwrap();
        assert!(bl.contains(Media::Svc, 11));
    }

    #[test]
    fn a_refused_delta_leaves_the_list_unchanged() {
        let mut bl = Blacklist::from_entries(3, realistic_sample(2000, 1));
        let before = bl.clone();
        let bad = delta(4, 5, vec![svc(1, 1_000_000)], vec![svc(0, u64::MAX)]);
        assert!(bl.apply_delta(&bad).is_err());
        assert_eq!(bl, before);
    }

    #[test]
    fn the_delta_between_two_lists_turns_one_into_the_other() {
        let old = Blacklist::from_entries(1, realistic_sample(5000, 1));
        let mut entries: Vec<Entry> = old.entries().skip(100).collect();
        entries.extend(realistic_sample(300, 2));
        entries.push(svc(3104_0000_0000_0000, 3104_0000_0100_0000));
        let new = Blacklist::from_entries(2, entries);
        let d = old.delta_to(&new);
        let mut applied = old.clone();
        applied.apply_delta(&d).unwrap();
        assert_eq!(applied, new);
        assert_eq!(BlacklistDelta::decode(&d.encode()).unwrap(), d.normalized());
    }

    #[test]
    fn a_list_with_a_delta_is_the_list_the_delta_applied_in_place_makes() {
        let base = Blacklist::from_entries(3, realistic_sample(3000, 5));
        let d = delta(3, 4, realistic_sample(100, 6), base.entries().step_by(7).collect());
        let mut applied = base.clone();
        applied.apply_delta(&d).unwrap();
        assert_eq!(base.with_delta(&d).unwrap(), applied);
        assert_eq!(base.version(), 3, "the list it was built from is unchanged");
        assert_eq!(
            base.with_delta(&delta(4, 5, vec![], vec![])).unwrap_err(),
            BlacklistError::DeltaGap { held: 3, from: 4 }
        );
    }

    #[test]
    fn two_deltas_compose_only_when_the_second_starts_where_the_first_ends() {
        let d1 = delta(1, 2, vec![svc(1, 1)], vec![]);
        assert_eq!(
            d1.then(&delta(3, 4, vec![], vec![])).unwrap_err(),
            BlacklistError::DeltaGap { held: 2, from: 3 }
        );
        assert_eq!(
            d1.then(&delta(1, 3, vec![], vec![])).unwrap_err(),
            BlacklistError::DeltaStale { held: 2, from: 1 }
        );
        let both = d1.then(&delta(2, 3, vec![svc(5, 9)], vec![svc(1, 1), svc(7, 7)])).unwrap();
        assert_eq!((both.from_version, both.to_version), (1, 3));
        let mut bl = Blacklist::from_entries(1, [svc(1, 3)]);
        bl.apply_delta(&both).unwrap();
        assert_eq!(bl.entries().collect::<Vec<_>>(), vec![svc(2, 3), svc(5, 9)]);
    }

    #[test]
    fn entries_read_from_json_are_validated() {
        let e: Entry = serde_json::from_str(r#"{"media":"svc","id":42}"#).unwrap();
        assert_eq!(e, svc(42, 42));
        let e: Entry = serde_json::from_str(r#"{"media":"qr","first":1,"last":9}"#).unwrap();
        assert_eq!(e, Entry { media: Media::Qr, first: 1, last: 9 });
        let round: Entry = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(round, e);
        for bad in [
            r#"{"media":"svc","first":9,"last":1}"#,
            r#"{"media":"svc","id":1,"first":1}"#,
            r#"{"media":"svc"}"#,
        ] {
            assert!(serde_json::from_str::<Entry>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn encoded_lists_that_are_not_canonical_are_refused() {
        // Hand-built svc sections: header 'B', format 1, version 1, then svc singles and ranges.
        let with_svc = |svc_section: &[u8]| {
            let mut v = vec![FULL_MAGIC, FORMAT, 1];
            v.extend_from_slice(svc_section);
            v.extend_from_slice(&[0, 0, 0, 0]); // qr and token: no singles, no ranges
            v
        };
        assert!(Blacklist::decode(&with_svc(&[2, 5, 2, 0])).is_ok());
        let not_canonical = |s: &[u8]| Blacklist::decode(&with_svc(s)).unwrap_err();
        // Two singles next to each other (5, 6).
        assert!(matches!(not_canonical(&[2, 5, 1, 0]), BlacklistError::NotCanonical { id: 6, .. }));
        // A repeated single.
        assert!(matches!(not_canonical(&[2, 5, 0, 0]), BlacklistError::NotCanonical { id: 5, .. }));
        // A range of one id.
        assert!(matches!(not_canonical(&[0, 1, 5, 0]), BlacklistError::RangeTooShort { first: 5, .. }));
        // A single touching a range 6..=8.
        assert!(matches!(not_canonical(&[1, 5, 1, 6, 2]), BlacklistError::NotCanonical { id: 6, .. }));
        // A single inside a range.
        assert!(matches!(not_canonical(&[1, 7, 1, 6, 2]), BlacklistError::NotCanonical { id: 7, .. }));
        // A count larger than the input.
        assert!(matches!(not_canonical(&[100, 5]), BlacklistError::CountTooLarge { count: 100, .. }));
        // An id past u64::MAX.
        let mut huge = vec![2];
        varint::put_u64(&mut huge, u64::MAX);
        huge.push(2);
        assert!(matches!(not_canonical(&huge), BlacklistError::IdOverflow { .. }));
    }

    #[test]
    fn encoded_lists_with_bad_framing_are_refused_distinctly() {
        let good = Blacklist::from_entries(9, [svc(1, 5)]).encode();
        assert_eq!(Blacklist::decode(&[]).unwrap_err(), BlacklistError::Truncated { field: "magic" });
        assert_eq!(
            Blacklist::decode(&[DELTA_MAGIC, FORMAT, 0]).unwrap_err(),
            BlacklistError::BadMagic { expected: FULL_MAGIC, found: DELTA_MAGIC }
        );
        let mut v = good.clone();
        v[1] = 9;
        assert_eq!(Blacklist::decode(&v).unwrap_err(), BlacklistError::UnsupportedFormat { found: 9 });
        let mut v = good.clone();
        v.push(0);
        assert_eq!(Blacklist::decode(&v).unwrap_err(), BlacklistError::TrailingBytes { count: 1 });
        assert!(matches!(
            Blacklist::decode(&good[..good.len() - 1]).unwrap_err(),
            BlacklistError::Truncated { .. }
        ));
    }

    #[test]
    fn a_million_realistic_entries_fit_in_16_mb_and_encode_to_under_4_bytes_each() {
        let entries = realistic_sample(1_000_000, 42);
        let bl = Blacklist::from_entries(1, entries.iter().copied());
        for e in entries.iter().step_by(997) {
            assert!(bl.contains(e.media, e.first) && bl.contains(e.media, e.last));
        }
        assert!(bl.entry_count() >= 1_000_000);
        assert!(bl.heap_bytes() <= 16 * 1024 * 1024, "heap {} bytes", bl.heap_bytes());
        let bytes = bl.encode();
        let per_entry = bytes.len() as f64 / entries.len() as f64;
        println!(
            "1,000,000 realistic entries: {} items, heap {} bytes, encoded {} bytes = {per_entry:.2} bytes/entry",
            bl.item_count(),
            bl.heap_bytes(),
            bytes.len()
        );
        assert!(per_entry < 4.0, "{per_entry} bytes per entry");
        assert_eq!(Blacklist::decode(&bytes).unwrap(), bl);
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        let media = prop_oneof![Just(Media::Svc), Just(Media::Qr), Just(Media::Token), Just(Media::Bank)];
        let near = (0u64..400, 0u64..5).prop_map(|(f, len)| (f, f + len));
        let edge = (0u64..4, 0u64..4).prop_map(|(a, b)| (u64::MAX - a, u64::MAX - b));
        let any = (any::<u64>(), any::<u64>());
        (media, prop_oneof![6 => near, 1 => edge, 1 => any]).prop_map(|(media, (first, last))| Entry {
            media,
            first,
            last,
        })
    }

    proptest! {
        #[test]
        fn membership_matches_a_naive_scan(entries in prop::collection::vec(arb_entry(), 0..40), probes in prop::collection::vec(0u64..420, 0..40)) {
            let bl = Blacklist::from_entries(1, entries.iter().copied());
            for m in Media::ALL {
                for &id in probes.iter().chain([u64::MAX, u64::MAX - 2].iter()) {
                    let naive = entries.iter().any(|e| e.media == m && e.bounds().0 <= id && id <= e.bounds().1);
                    prop_assert_eq!(bl.contains(m, id), naive);
                }
            }
        }

        #[test]
        fn full_lists_round_trip_through_their_encoding(entries in prop::collection::vec(arb_entry(), 0..40), version in any::<u64>()) {
            let bl = Blacklist::from_entries(version, entries);
            prop_assert_eq!(Blacklist::decode(&bl.encode()).unwrap(), bl);
        }

        #[test]
        fn deltas_round_trip_and_apply_like_set_operations(
            base in prop::collection::vec(arb_entry(), 0..30),
            add in prop::collection::vec(arb_entry(), 0..10),
            remove in prop::collection::vec(arb_entry(), 0..10),
            probes in prop::collection::vec(0u64..420, 0..30),
        ) {
            let d = delta(1, 2, add.clone(), remove.clone());
            let decoded = BlacklistDelta::decode(&d.encode()).unwrap();
            prop_assert_eq!(&decoded, &d.normalized());
            let mut bl = Blacklist::from_entries(1, base.iter().copied());
            bl.apply_delta(&decoded).unwrap();
            let covers = |es: &[Entry], m: Media, id: u64| es.iter().any(|e| e.media == m && e.bounds().0 <= id && id <= e.bounds().1);
            for m in Media::ALL {
                for &id in &probes {
                    let expect = covers(&add, m, id) || (covers(&base, m, id) && !covers(&remove, m, id));
                    prop_assert_eq!(bl.contains(m, id), expect);
                }
            }
            // The result is canonical: building it again from its entries changes nothing.
            prop_assert_eq!(Blacklist::from_entries(2, bl.entries()), bl);
        }

        #[test]
        fn patching_near_the_changes_makes_what_one_merge_over_every_item_makes(
            base in prop::collection::vec(arb_entry(), 0..60),
            add in prop::collection::vec(arb_entry(), 0..12),
            remove in prop::collection::vec(arb_entry(), 0..12),
        ) {
            let list = Blacklist::from_entries(1, base);
            let (add, remove) = (intervals_by_media(&add), intervals_by_media(&remove));
            for i in 0..MEDIA_SLOTS {
                prop_assert_eq!(list.lists[i].patched(&add[i], &remove[i]), list.lists[i].merged(&add[i], &remove[i]));
            }
        }

        #[test]
        fn a_composed_delta_applies_like_its_two_deltas_in_turn(
            base in prop::collection::vec(arb_entry(), 0..30),
            add1 in prop::collection::vec(arb_entry(), 0..10),
            remove1 in prop::collection::vec(arb_entry(), 0..10),
            add2 in prop::collection::vec(arb_entry(), 0..10),
            remove2 in prop::collection::vec(arb_entry(), 0..10),
        ) {
            let (d1, d2) = (delta(1, 2, add1, remove1), delta(2, 3, add2, remove2));
            let mut in_turn = Blacklist::from_entries(1, base.iter().copied());
            in_turn.apply_delta(&d1).unwrap();
            in_turn.apply_delta(&d2).unwrap();
            let at_once = Blacklist::from_entries(1, base).with_delta(&d1.then(&d2).unwrap()).unwrap();
            prop_assert_eq!(at_once, in_turn);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200), magic in prop_oneof![Just(FULL_MAGIC), Just(DELTA_MAGIC)]) {
            let _ = Blacklist::decode(&bytes);
            let _ = BlacklistDelta::decode(&bytes);
            let mut framed = vec![magic, FORMAT];
            framed.extend_from_slice(&bytes);
            if let Ok(bl) = Blacklist::decode(&framed) {
                prop_assert_eq!(bl.encode(), framed.clone());
            }
            if let Ok(d) = BlacklistDelta::decode(&framed) {
                prop_assert_eq!(d.encode(), framed);
            }
        }
    }
}
