//! Cursor pagination shared by every list endpoint.
//!
//! Items carry a creation sequence number. A cursor is an opaque token naming the sequence
//! number of the last (or first) item of the page it came from, so walking pages stays
//! stable while new items are created: no item is skipped or repeated.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

/// Direction of a listing, by creation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Asc,
    Desc,
}

impl Order {
    /// Parses `asc`/`desc` (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        if s.eq_ignore_ascii_case("asc") {
            Some(Self::Asc)
        } else if s.eq_ignore_ascii_case("desc") {
            Some(Self::Desc)
        } else {
            None
        }
    }

    /// Whether sequence `a` is listed before sequence `b`.
    fn precedes(self, a: u64, b: u64) -> bool {
        match self {
            Self::Asc => a < b,
            Self::Desc => a > b,
        }
    }
}

/// A position in a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cursor {
    /// The items listed after the item with this sequence number.
    After(u64),
    /// The items listed before the item with this sequence number.
    Before(u64),
}

impl Cursor {
    /// The opaque token handed to clients as `next_page`/`prev_page`.
    pub fn encode(self) -> String {
        let raw = match self {
            Self::After(seq) => format!("after:{seq}"),
            Self::Before(seq) => format!("before:{seq}"),
        };
        format!("page_{}", URL_SAFE_NO_PAD.encode(raw))
    }

    /// Parses a token produced by [`Cursor::encode`].
    pub fn decode(token: &str) -> Option<Self> {
        let bytes = URL_SAFE_NO_PAD.decode(token.strip_prefix("page_")?).ok()?;
        let raw = String::from_utf8(bytes).ok()?;
        if let Some(seq) = raw.strip_prefix("after:") {
            seq.parse().ok().map(Self::After)
        } else {
            raw.strip_prefix("before:")?.parse().ok().map(Self::Before)
        }
    }
}

/// What the client asked for.
#[derive(Debug, Clone, Copy)]
pub struct PageParams {
    pub limit: usize,
    pub order: Order,
    pub cursor: Option<Cursor>,
}

/// One page of results.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub data: Vec<T>,
    pub next_page: Option<String>,
    pub prev_page: Option<String>,
}

/// Pages through `items`, which must be sorted by ascending sequence number.
pub fn paginate<T: Clone>(items: &[(u64, T)], params: &PageParams) -> Page<T> {
    let order = params.order;
    let ordered: Vec<&(u64, T)> = match order {
        Order::Asc => items.iter().collect(),
        Order::Desc => items.iter().rev().collect(),
    };
    let len = ordered.len();
    let limit = params.limit.max(1);
    let (start, end) = match params.cursor {
        None => (0, limit.min(len)),
        Some(Cursor::After(seq)) => {
            let start = ordered
                .iter()
                .position(|(s, _)| order.precedes(seq, *s))
                .unwrap_or(len);
            (start, (start + limit).min(len))
        }
        Some(Cursor::Before(seq)) => {
            let end = ordered
                .iter()
                .position(|(s, _)| !order.precedes(*s, seq))
                .unwrap_or(len);
            (end.saturating_sub(limit), end)
        }
    };
    let window = &ordered[start..end];
    let next_page = match window.last() {
        Some((seq, _)) if end < len => Some(Cursor::After(*seq).encode()),
        _ => None,
    };
    let prev_page = match window.first() {
        Some((seq, _)) if start > 0 => Some(Cursor::Before(*seq).encode()),
        _ => None,
    };
    Page {
        data: window.iter().map(|(_, item)| item.clone()).collect(),
        next_page,
        prev_page,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn items(n: u64) -> Vec<(u64, u64)> {
        (1..=n).map(|s| (s * 10, s)).collect()
    }

    fn params(limit: usize, order: Order, cursor: Option<&str>) -> PageParams {
        PageParams {
            limit,
            order,
            cursor: cursor.map(|c| Cursor::decode(c).unwrap()),
        }
    }

    fn walk(all: &[(u64, u64)], limit: usize, order: Order) -> Vec<u64> {
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = paginate(all, &params(limit, order, cursor.as_deref()));
            seen.extend(page.data);
            match page.next_page {
                Some(next) => cursor = Some(next),
                None => return seen,
            }
        }
    }

    #[test]
    fn cursor_round_trip_and_garbage() {
        for c in [Cursor::After(0), Cursor::Before(123_456)] {
            assert_eq!(Cursor::decode(&c.encode()), Some(c));
        }
        assert_eq!(Cursor::decode("nope"), None);
        assert_eq!(Cursor::decode("page_!!"), None);
        assert_eq!(Cursor::decode("page_"), None);
    }

    #[test]
    fn walks_every_item_once_in_both_orders() {
        let all = items(7);
        assert_eq!(walk(&all, 3, Order::Asc), vec![1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(walk(&all, 3, Order::Desc), vec![7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(walk(&all, 100, Order::Asc).len(), 7);
        assert_eq!(walk(&[], 5, Order::Desc), Vec::<u64>::new());
    }

    #[test]
    fn last_full_page_has_no_next_and_first_has_no_prev() {
        let all = items(4);
        let first = paginate(&all, &params(2, Order::Asc, None));
        assert_eq!(first.data, vec![1, 2]);
        assert!(first.prev_page.is_none());
        let second = paginate(&all, &params(2, Order::Asc, first.next_page.as_deref()));
        assert_eq!(second.data, vec![3, 4]);
        assert!(second.next_page.is_none());
        let back = paginate(&all, &params(2, Order::Asc, second.prev_page.as_deref()));
        assert_eq!(back.data, vec![1, 2]);
        assert!(back.prev_page.is_none());
        assert!(back.next_page.is_some());
    }

    #[test]
    fn stable_when_items_are_created_between_pages() {
        let mut all = items(5);
        let first = paginate(&all, &params(2, Order::Desc, None));
        assert_eq!(first.data, vec![5, 4]);
        all.push((60, 6)); // a newer item appears
        let second = paginate(&all, &params(2, Order::Desc, first.next_page.as_deref()));
        assert_eq!(second.data, vec![3, 2]);
        assert!(first.prev_page.is_none());
        let prev = paginate(&all, &params(2, Order::Desc, second.prev_page.as_deref()));
        assert_eq!(prev.data, vec![5, 4]);
        assert!(prev.prev_page.is_some(), "item 6 is now before item 5");
    }
}
