//! Key-ordered paging with opaque continuation tokens that stay correct while the map changes.
//!
//! A token names the key a page ended (or began) at and the direction to go on; the next page
//! starts strictly after that key, so inserts and removals between calls never repeat or skip
//! an item that was present for both calls.

use std::collections::BTreeMap;
use std::ops::Bound;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::event::Item;
use crate::limits;

/// Listing order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// Ascending by key.
    #[default]
    Asc,
    /// Descending by key.
    Desc,
}

/// Whether `from` itself is part of the listing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Bounds {
    /// Start at `from` if it exists.
    #[default]
    Inclusive,
    /// Start just after `from`.
    Exclusive,
}

/// What page to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageRequest {
    /// Listing order (ignored when a token is given: the token carries it).
    pub order: Order,
    /// Key to start from.
    pub from: Option<String>,
    /// Whether `from` is included.
    pub bounds: Bounds,
    /// Items per page, 1..=100; `None` means 50.
    pub page_size: Option<i64>,
    /// A token from a previous [`Page`]; when given, `order`, `from` and `bounds` are ignored.
    pub token: Option<String>,
}

/// One page of items.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// The items, in listing order.
    pub items: Vec<Item>,
    /// Token of the following page, if there are more items.
    pub next_token: Option<String>,
    /// Token of the preceding page, if there are items before this page.
    pub prev_token: Option<String>,
    /// The page size used.
    pub page_size: usize,
    /// The id of the newest event of the map this page reflects (0: none yet). For the keys
    /// this page covers (from just after the previous page's last key to its own last key),
    /// the map's events after it are exactly the changes the page does not show.
    pub last_event_id: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Token {
    /// What is listed (the map's sid): a token of another listing is refused.
    s: String,
    /// Listing order.
    o: Order,
    /// Anchor key (exclusive).
    k: String,
    /// `true`: the page after the anchor in listing order; `false`: the page before it.
    n: bool,
}

fn encode_token(t: &Token) -> String {
    let json = serde_json::to_vec(t).unwrap_or_default();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
}

fn decode_token(s: &str) -> Result<Token> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| Error::InvalidPageToken)?;
    serde_json::from_slice(&raw).map_err(|_| Error::InvalidPageToken)
}

/// Walks `view` from `start` in ascending (`up`) or descending key order.
fn walk<'a, S>(
    view: &'a BTreeMap<Box<str>, S>,
    start: Bound<&'a str>,
    up: bool,
) -> Box<dyn Iterator<Item = (&'a Box<str>, &'a S)> + 'a> {
    if up {
        Box::new(view.range::<str, _>((start, Bound::Unbounded)))
    } else {
        Box::new(view.range::<str, _>((Bound::Unbounded, start)).rev())
    }
}

/// Lists one page of `view`, skipping entries for which `visible` is false.
pub(crate) fn page<S>(
    scope: &str,
    view: &BTreeMap<Box<str>, S>,
    req: &PageRequest,
    visible: impl Fn(&S) -> bool,
    to_item: impl Fn(&str, &S) -> Item,
) -> Result<Page> {
    let size = match req.page_size {
        Some(n) => limits::validate_page_size(n)?,
        None => limits::DEFAULT_PAGE_SIZE,
    };
    let token = req.token.as_deref().map(decode_token).transpose()?;
    if token.as_ref().is_some_and(|t| t.s != scope) {
        return Err(Error::InvalidPageToken);
    }
    let (order, start, forward) = match &token {
        Some(t) => (t.o, Bound::Excluded(t.k.as_str()), t.n),
        None => {
            let start = match (&req.from, req.bounds) {
                (None, _) => Bound::Unbounded,
                (Some(f), Bounds::Inclusive) => Bound::Included(f.as_str()),
                (Some(f), Bounds::Exclusive) => Bound::Excluded(f.as_str()),
            };
            (req.order, start, true)
        }
    };
    let asc = order == Order::Asc;
    // Walking "forward" means in listing order; backward pages are collected then reversed.
    let up = asc == forward;
    let mut picked: Vec<(&Box<str>, &S)> = walk(view, start, up)
        .filter(|(_, s)| visible(s))
        .take(size)
        .collect();
    if !forward {
        picked.reverse();
    }
    let exists_beyond = |key: &str, listing_forward: bool| -> bool {
        walk(view, Bound::Excluded(key), asc == listing_forward).any(|(_, s)| visible(s))
    };
    let next_token = picked
        .last()
        .filter(|(k, _)| exists_beyond(k, true))
        .map(|(k, _)| {
            encode_token(&Token {
                s: scope.to_string(),
                o: order,
                k: (*k).to_string(),
                n: true,
            })
        });
    let prev_token = picked
        .first()
        .filter(|(k, _)| exists_beyond(k, false))
        .map(|(k, _)| {
            encode_token(&Token {
                s: scope.to_string(),
                o: order,
                k: (*k).to_string(),
                n: false,
            })
        });
    Ok(Page {
        items: picked.iter().map(|(k, s)| to_item(k, s)).collect(),
        next_token,
        prev_token,
        page_size: size,
        last_event_id: 0,
    })
}
