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
pub fn strip_tags(input: &str) -> String {
    let mut text = input.to_owned();
    for _ in 0..MAX_STRIP_ROUNDS {
        let cleaned = cleaner().clean(&text).to_string();
        let next = unescape_text(&cleaned);
        if next == text {
            return text;
        }
        text = next;
    }
    cleaner().clean(&text).to_string()
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
pub fn display_name(raw: &str) -> Result<String, FieldError> {
    let name = strip_tags(raw).trim().to_owned();
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
/// whitespace only.
pub fn content(raw: &str) -> Result<String, FieldError> {
    let text = strip_tags(raw);
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
    fn message_ids_are_bounded() {
        assert!(message_id("m-1").is_ok());
        assert!(message_id("").is_err());
        assert!(message_id(&"x".repeat(128)).is_ok());
        assert!(message_id(&"x".repeat(129)).is_err());
        assert!(message_id("a\nb").is_err());
    }
}
