//! Input sanitizing and validation: tag stripping (via `ammonia`), UUID v4 ids, length limits.
//!
//! Everything here is pure and counts Unicode scalar values (`char`s), never bytes.

use std::collections::HashSet;
use std::sync::OnceLock;

use uuid::{Uuid, Variant, Version};

/// Fewest characters in a display name, after trimming and tag stripping.
pub const DISPLAY_NAME_MIN_CHARS: usize = 3;
/// Most characters in a display name, after trimming and tag stripping.
pub const DISPLAY_NAME_MAX_CHARS: usize = 50;
/// Fewest characters in message content, after tag stripping.
pub const CONTENT_MIN_CHARS: usize = 1;
/// Most characters in message content, after tag stripping.
pub const CONTENT_MAX_CHARS: usize = 1000;
/// Most characters in a client-chosen `message_id`.
pub const MESSAGE_ID_MAX_CHARS: usize = 128;

/// Most bytes of a raw (unsanitized) `display_name`. 50 characters are at most 200 bytes of
/// UTF-8; the rest leaves room for tags and entities around a valid name. Anything longer could
/// never sanitize to a valid name cheaply, so it is refused before the HTML parser sees it.
pub const DISPLAY_NAME_MAX_RAW_BYTES: usize = 1024;
/// Most bytes of raw (unsanitized) `content`: 1000 characters are at most 4000 bytes of UTF-8,
/// or 5000 when every character is written as an entity such as `&amp;`; twice that leaves room
/// for markup. Longer input is refused before the HTML parser sees it.
pub const CONTENT_MAX_RAW_BYTES: usize = 10 * 1024;
/// Most `<` characters in a raw `display_name` (and in each re-parsed round of it).
pub const DISPLAY_NAME_MAX_TAGS: usize = 32;
/// Most `<` characters in raw `content` (and in each re-parsed round of it).
///
/// The HTML tree builder walks its stack of open elements for each tag, so deeply nested markup
/// costs time quadratic in the number of tags (12,000 nested `<div>`s took ~240 ms). Capping the
/// tags, on top of the byte cap, keeps the parser's work per frame small and bounded.
pub const CONTENT_MAX_TAGS: usize = 256;

/// How many strip rounds [`strip_tags`] runs before giving up on reaching a fixed point.
const MAX_STRIP_ROUNDS: usize = 8;

fn cleaner() -> &'static ammonia::Builder<'static> {
    static CLEANER: OnceLock<ammonia::Builder<'static>> = OnceLock::new();
    CLEANER.get_or_init(|| {
        let mut builder = ammonia::Builder::empty();
        builder
            .tags(HashSet::new())
            .clean_content_tags(HashSet::from(["script", "style"]))
            .strip_comments(true);
        builder
    })
}

/// Undoes the escaping html5ever's serializer applies to text nodes (`&amp;`, `&lt;`, `&gt;`,
/// `&nbsp;`) in one pass, so `&amp;lt;` becomes `&lt;`, not `<`.
fn unescape_text(html: &str) -> String {
    const ENTITIES: [(&str, char); 4] = [
        ("&amp;", '&'),
        ("&lt;", '<'),
        ("&gt;", '>'),
        ("&nbsp;", '\u{a0}'),
    ];
    let mut out = String::with_capacity(html.len());
    let mut rest = html;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        match ENTITIES.iter().find(|(entity, _)| tail.starts_with(entity)) {
            Some((entity, ch)) => {
                out.push(*ch);
                rest = &tail[entity.len()..];
            }
            None => {
                out.push('&');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Strips HTML tags and comments from `input` and returns plain text: the text between tags is
/// kept, `<script>`/`<style>` bodies are dropped, entities are decoded.
///
/// Decoding entities could reveal new tags (`&lt;b&gt;` is `<b>`), so stripping repeats until the
/// text no longer changes; the result contains nothing an HTML parser would read as a tag. In the
/// pathological case that no fixed point is reached within a few rounds, the HTML-escaped output
/// of the last round is returned, which is still tag-free.
///
/// This does not bound its work: untrusted input goes through [`strip_tags_bounded`].
pub fn strip_tags(input: &str) -> String {
    strip_tags_bounded(input, usize::MAX).unwrap_or_default()
}

/// [`strip_tags`] that refuses (`None`) input with more than `max_tags` `<` characters, checked
/// before every parse round (decoding `&lt;` can reveal new ones), so the HTML parser's work is
/// bounded by the input's length and `max_tags`.
pub fn strip_tags_bounded(input: &str, max_tags: usize) -> Option<String> {
    let too_much_markup = |text: &str| text.bytes().filter(|b| *b == b'<').count() > max_tags;
    let mut text = input.to_owned();
    for _ in 0..MAX_STRIP_ROUNDS {
        if too_much_markup(&text) {
            return None;
        }
        let cleaned = cleaner().clean(&text).to_string();
        let next = unescape_text(&cleaned);
        if next == text {
            return Some(text);
        }
        text = next;
    }
    if too_much_markup(&text) {
        return None;
    }
    Some(cleaner().clean(&text).to_string())
}

/// The error for raw input that is too large or has too much markup to be worth parsing.
fn too_large(field: &'static str, max_bytes: usize, max_tags: usize) -> FieldError {
    FieldError::new(
        field,
        format!(
            "{field} is too large before sanitizing (at most {max_bytes} bytes and {max_tags} tags)"
        ),
    )
}

/// Why a field is invalid; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The offending field, e.g. `user_id`.
    pub field: &'static str,
    /// A human-readable explanation starting with the field name.
    pub message: String,
}

impl FieldError {
    /// An error for `field` with `message`.
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

/// Parses a user id: a UUID v4 in the canonical hyphenated form (36 characters, any case).
pub fn parse_user_id(field: &'static str, raw: &str) -> Result<Uuid, FieldError> {
    let invalid = || FieldError::new(field, format!("{field} must be a UUID v4"));
    let bytes = raw.as_bytes();
    let hyphens_ok = bytes.len() == 36
        && bytes
            .iter()
            .enumerate()
            .all(|(i, b)| matches!(i, 8 | 13 | 18 | 23) == (*b == b'-'));
    if !hyphens_ok {
        return Err(invalid());
    }
    let id = Uuid::try_parse(raw).map_err(|_| invalid())?;
    if id.get_version() != Some(Version::Random) || id.get_variant() != Variant::RFC4122 {
        return Err(invalid());
    }
    Ok(id)
}

/// Sanitizes a display name: tags stripped, then trimmed, then 3–50 characters.
/// Raw input over [`DISPLAY_NAME_MAX_RAW_BYTES`] or [`DISPLAY_NAME_MAX_TAGS`] is refused before
/// parsing.
pub fn display_name(raw: &str) -> Result<String, FieldError> {
    let refuse = || {
        too_large(
            "display_name",
            DISPLAY_NAME_MAX_RAW_BYTES,
            DISPLAY_NAME_MAX_TAGS,
        )
    };
    if raw.len() > DISPLAY_NAME_MAX_RAW_BYTES {
        return Err(refuse());
    }
    let name = strip_tags_bounded(raw, DISPLAY_NAME_MAX_TAGS)
        .ok_or_else(refuse)?
        .trim()
        .to_owned();
    let chars = name.chars().count();
    if !(DISPLAY_NAME_MIN_CHARS..=DISPLAY_NAME_MAX_CHARS).contains(&chars) {
        return Err(FieldError::new(
            "display_name",
            format!(
                "display_name must be {DISPLAY_NAME_MIN_CHARS}-{DISPLAY_NAME_MAX_CHARS} characters after trimming and tag stripping (got {chars})"
            ),
        ));
    }
    Ok(name)
}

/// Sanitizes message content: tags stripped (not trimmed), then 1–1000 characters and not
/// whitespace only. Raw input over [`CONTENT_MAX_RAW_BYTES`] or [`CONTENT_MAX_TAGS`] is refused
/// before parsing.
pub fn content(raw: &str) -> Result<String, FieldError> {
    let refuse = || too_large("content", CONTENT_MAX_RAW_BYTES, CONTENT_MAX_TAGS);
    if raw.len() > CONTENT_MAX_RAW_BYTES {
        return Err(refuse());
    }
    let text = strip_tags_bounded(raw, CONTENT_MAX_TAGS).ok_or_else(refuse)?;
    let chars = text.chars().count();
    if !(CONTENT_MIN_CHARS..=CONTENT_MAX_CHARS).contains(&chars) {
        return Err(FieldError::new(
            "content",
            format!(
                "content must be {CONTENT_MIN_CHARS}-{CONTENT_MAX_CHARS} characters after tag stripping (got {chars})"
            ),
        ));
    }
    if text.trim().is_empty() {
        return Err(FieldError::new(
            "content",
            "content must not be blank after tag stripping",
        ));
    }
    Ok(text)
}

/// Validates a client-chosen message id: 1–128 characters, no control characters.
pub fn message_id(raw: &str) -> Result<String, FieldError> {
    let chars = raw.chars().count();
    if chars == 0 || chars > MESSAGE_ID_MAX_CHARS || raw.chars().any(char::is_control) {
        return Err(FieldError::new(
            "message_id",
            format!(
                "message_id must be 1-{MESSAGE_ID_MAX_CHARS} characters without control characters"
            ),
        ));
    }
    Ok(raw.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_tags_keeps_text_and_drops_script_and_style_bodies() {
        assert_eq!(strip_tags("<b>bold</b> text"), "bold text");
        assert_eq!(strip_tags("a<script>alert(1)</script>b"), "ab");
        assert_eq!(strip_tags("<style>p{}</style>hi"), "hi");
        assert_eq!(strip_tags("x<!-- comment -->y"), "xy");
        assert_eq!(strip_tags("<img src=x onerror=alert(1)>"), "");
        assert_eq!(strip_tags("<a href='javascript:x'>link</a>"), "link");
    }

    #[test]
    fn plain_text_survives_unescaped() {
        assert_eq!(strip_tags("1 < 2 && 3 > 2"), "1 < 2 && 3 > 2");
        assert_eq!(strip_tags("fish & chips"), "fish & chips");
        assert_eq!(strip_tags("héllo wörld 👋"), "héllo wörld 👋");
        assert_eq!(strip_tags("  spaced  "), "  spaced  ");
        assert_eq!(strip_tags("line\nbreak"), "line\nbreak");
    }

    #[test]
    fn encoded_tags_are_stripped_too() {
        assert_eq!(strip_tags("&lt;script&gt;alert(1)&lt;/script&gt;ok"), "ok");
        assert_eq!(strip_tags("&lt;b&gt;x&lt;/b&gt;"), "x");
        assert_eq!(strip_tags("&amp;lt;i&amp;gt;y"), "y");
        let out = strip_tags("&amp;amp;lt;script&amp;amp;gt;z");
        assert!(!out.contains('<'), "{out}");
    }

    #[test]
    fn unescape_is_single_pass() {
        assert_eq!(unescape_text("&amp;lt;"), "&lt;");
        assert_eq!(unescape_text("a &lt; b &gt; c &amp; d"), "a < b > c & d");
        assert_eq!(unescape_text("&unknown; &"), "&unknown; &");
    }

    #[test]
    fn user_ids_must_be_canonical_uuid_v4() {
        let id = "0f8fad5b-d9cb-469f-a165-70867728950e";
        assert_eq!(
            parse_user_id("user_id", id).map(|u| u.to_string()),
            Ok(id.into())
        );
        let upper = id.to_uppercase();
        assert_eq!(
            parse_user_id("user_id", &upper).map(|u| u.to_string()),
            Ok(id.into())
        );
        for bad in [
            "",
            "test-123",
            "0f8fad5bd9cb469fa16570867728950e",
            "{0f8fad5b-d9cb-469f-a165-70867728950e}",
            "0f8fad5b-d9cb-169f-a165-70867728950e", // v1
            "0f8fad5b-d9cb-569f-a165-70867728950e", // v5
            "0f8fad5b-d9cb-469f-c165-70867728950e", // wrong variant
            "0f8fad5b-d9cb-469f-a165-70867728950g",
            "00000000-0000-0000-0000-000000000000",
        ] {
            let error = parse_user_id("user_id", bad).unwrap_err();
            assert_eq!(error.field, "user_id");
            assert!(error.message.contains("UUID v4"), "{bad}: {error:?}");
        }
    }

    #[test]
    fn display_names_count_characters_after_trimming_and_stripping() {
        assert_eq!(display_name("  Bob  ").as_deref(), Ok("Bob"));
        assert_eq!(display_name("<b>Ann</b>").as_deref(), Ok("Ann"));
        assert!(display_name("ab").is_err());
        assert!(display_name("  ab   ").is_err());
        assert!(display_name("<i>ab</i>").is_err());
        assert_eq!(display_name("éèà").as_deref(), Ok("éèà"));
        assert!(display_name(&"é".repeat(50)).is_ok());
        assert!(display_name(&"é".repeat(51)).is_err());
        assert_eq!(display_name("ab").unwrap_err().field, "display_name");
    }

    #[test]
    fn content_counts_characters_not_bytes() {
        assert!(content("x").is_ok());
        assert!(content(&"ü".repeat(1000)).is_ok());
        assert!(content(&"ü".repeat(1001)).is_err());
        assert!(content(&"🦀".repeat(1000)).is_ok());
        assert!(content("").is_err());
        assert!(content("   ").is_err());
        assert!(content("<b></b>").is_err());
        assert_eq!(
            content(&format!("<b>{}</b>", "a".repeat(1000))).map(|c| c.len()),
            Ok(1000)
        );
        assert_eq!(content("").unwrap_err().field, "content");
    }

    #[test]
    fn oversized_or_markup_heavy_input_is_refused_before_parsing() {
        let nested = "<div>".repeat(12_000);
        let started = std::time::Instant::now();
        assert_eq!(display_name(&nested).unwrap_err().field, "display_name");
        assert_eq!(content(&nested).unwrap_err().field, "content");
        // Within the byte caps but full of tags: refused by the tag cap.
        let tags = "<i>".repeat(CONTENT_MAX_TAGS + 1);
        assert!(tags.len() <= CONTENT_MAX_RAW_BYTES);
        assert_eq!(content(&tags).unwrap_err().field, "content");
        assert!(display_name(&"<i>".repeat(DISPLAY_NAME_MAX_TAGS + 1)).is_err());
        // Entities that decode into tags count in the next round.
        let encoded = "&lt;i&gt;".repeat(CONTENT_MAX_TAGS + 1);
        assert!(strip_tags_bounded(&encoded, CONTENT_MAX_TAGS).is_none());
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        // The largest legitimate inputs still pass.
        assert!(content(&format!("<b>{}</b>", "&amp;".repeat(1000))).is_ok());
        assert!(content(&"<b>x</b>".repeat(CONTENT_MAX_TAGS / 2)).is_ok());
        assert!(display_name(&format!("<b>{}</b>", "🦀".repeat(50))).is_ok());
    }

    #[test]
    fn message_ids_are_bounded() {
        assert!(message_id("m-1").is_ok());
        assert!(message_id("").is_err());
        assert!(message_id(&"x".repeat(128)).is_ok());
        assert!(message_id(&"x".repeat(129)).is_err());
        assert!(message_id("a\nb").is_err());
    }
}
