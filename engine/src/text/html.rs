//! Python's `html.unescape`, character for character: Wan's pipelines clean
//! every prompt with it (twice) before tokenizing, so a prompt with `&amp;`
//! or `&#39;` reaches the tokenizer as diffusers gives it.
//!
//! Python follows the HTML5 rules for text content with two differences
//! from a browser that a WHATWG decoder would not reproduce: numeric
//! references to control characters and noncharacters are removed (not
//! kept), and a reference's name may be up to 32 characters of anything but
//! `\t \n \f space < & # ;`. The named table is Python's own
//! (`html.entities.html5`, 2231 names), generated into `html_entities.rs`.

use super::html_entities::HTML5_ENTITIES;

/// `html.unescape(text)`.
pub fn unescape(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '&' {
            if let Some((replacement, len)) = reference_at(&chars[i + 1..]) {
                out.push_str(&replacement);
                i += 1 + len;
                continue;
            }
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

/// The reference that starts right after an `&` (Python's `_charref`
/// pattern, alternatives in its order), as its replacement and the number
/// of characters it spans; `None` where the pattern does not match.
fn reference_at(rest: &[char]) -> Option<(String, usize)> {
    if rest.first() == Some(&'#') {
        // `#[0-9]+;?` then `#[xX][0-9a-fA-F]+;?`; a `#` fits no name.
        let (radix, start) = match rest.get(1) {
            Some('x' | 'X') => (16, 2),
            _ => (10, 1),
        };
        let digits = rest[start..]
            .iter()
            .take_while(|c| c.is_digit(radix) && c.is_ascii())
            .count();
        if digits == 0 {
            return None;
        }
        let end = start + digits;
        let len = end + usize::from(rest.get(end) == Some(&';'));
        let number = rest[start..end].iter().fold(0u32, |n, c| {
            // Saturates above every valid code point: Python's int is
            // unbounded, and any value past 0x10FFFF maps to U+FFFD alike.
            let d = c.to_digit(radix).expect("checked digit");
            n.saturating_mul(radix).saturating_add(d)
        });
        return Some((numeric_reference(number), len));
    }
    // `[^\t\n\f <&#;]{1,32};?`: a name candidate, greedy.
    let name_len = rest
        .iter()
        .take(32)
        .take_while(|c| !matches!(c, '\t' | '\n' | '\x0c' | ' ' | '<' | '&' | '#' | ';'))
        .count();
    if name_len == 0 {
        return None;
    }
    let len = name_len + usize::from(rest.get(name_len) == Some(&';'));
    let candidate: String = rest[..len].iter().collect();
    Some((named_reference(&candidate), len))
}

/// Python's `_replace_charref` for a numeric reference.
fn numeric_reference(number: u32) -> String {
    if let Some(c) = windows_1252_fixup(number) {
        return c.to_string();
    }
    if (0xD800..=0xDFFF).contains(&number) || number > 0x10FFFF {
        return '\u{FFFD}'.to_string();
    }
    if is_invalid_codepoint(number) {
        return String::new();
    }
    char::from_u32(number)
        .expect("surrogates and values past U+10FFFF were handled above")
        .to_string()
}

/// Python's `_invalid_charrefs`: NUL, CR, and C1 controls read as the
/// Windows-1252 characters that web pages meant by them.
fn windows_1252_fixup(number: u32) -> Option<char> {
    const C1: [char; 32] = [
        '\u{20ac}', '\u{81}', '\u{201a}', '\u{192}', '\u{201e}', '\u{2026}', '\u{2020}',
        '\u{2021}', '\u{2c6}', '\u{2030}', '\u{160}', '\u{2039}', '\u{152}', '\u{8d}', '\u{17d}',
        '\u{8f}', '\u{90}', '\u{2018}', '\u{2019}', '\u{201c}', '\u{201d}', '\u{2022}', '\u{2013}',
        '\u{2014}', '\u{2dc}', '\u{2122}', '\u{161}', '\u{203a}', '\u{153}', '\u{9d}', '\u{17e}',
        '\u{178}',
    ];
    match number {
        0x00 => Some('\u{FFFD}'),
        0x0d => Some('\r'),
        0x80..=0x9f => Some(C1[(number - 0x80) as usize]),
        _ => None,
    }
}

/// Python's `_invalid_codepoints`: controls other than tab, LF, FF and CR,
/// and the Unicode noncharacters; references to them are dropped.
fn is_invalid_codepoint(number: u32) -> bool {
    matches!(number, 0x1..=0x8 | 0xb | 0xe..=0x1f | 0x7f..=0x9f | 0xfdd0..=0xfdef)
        || (number & 0xfffe == 0xfffe && number <= 0x10ffff)
}

/// Python's `_replace_charref` for a name (`candidate` is what followed the
/// `&`, with its `;` if any): the name itself, else its longest prefix of
/// at least two characters that is a name (only the legacy names without a
/// `;` can be), else the text unchanged.
fn named_reference(candidate: &str) -> String {
    if let Some(value) = lookup(candidate) {
        return value.to_string();
    }
    let boundaries: Vec<usize> = candidate.char_indices().map(|(i, _)| i).collect();
    for x in (2..boundaries.len()).rev() {
        let (prefix, tail) = candidate.split_at(boundaries[x]);
        if let Some(value) = lookup(prefix) {
            return format!("{value}{tail}");
        }
    }
    format!("&{candidate}")
}

fn lookup(name: &str) -> Option<&'static str> {
    HTML5_ENTITIES
        .binary_search_by(|(n, _)| n.as_bytes().cmp(name.as_bytes()))
        .ok()
        .map(|i| HTML5_ENTITIES[i].1)
}

#[cfg(test)]
mod tests {
    use super::unescape;

    /// Inputs and `html.unescape` outputs from CPython 3.11.
    #[test]
    fn matches_python() {
        for (input, expected) in [
            ("no references", "no references"),
            ("&amp; &lt; &gt; &quot; &#39;", "& < > \" '"),
            ("&amp", "&"),
            ("&ampx", "&x"),
            ("&amp;lt;", "&lt;"),
            ("&notit;", "¬it;"),
            ("&notin;", "∉"),
            ("&noti", "¬i"),
            ("&copy2024", "©2024"),
            ("&unknown;", "&unknown;"),
            ("&;", "&;"),
            ("& amp;", "& amp;"),
            ("&&amp;", "&&"),
            ("&#65;&#x42;&#X43;&#68", "ABCD"),
            ("&#x;&#;&#xg;", "&#x;&#;&#xg;"),
            ("&#0;", "\u{fffd}"),
            ("&#13;", "\r"),
            ("&#128;&#x9f;", "€Ÿ"),
            ("&#x81;", "\u{81}"),
            ("&#1;a&#11;b&#x7f;c&#xfdd0;d&#xffff;e&#x10fffe;", "abcde"),
            ("&#12;", "\u{c}"),
            (
                "&#xd800;&#x110000;&#99999999999999999999;",
                "\u{fffd}\u{fffd}\u{fffd}",
            ),
            ("&#x1F600;", "😀"),
            ("&NotNestedGreaterGreater;", "\u{2aa2}\u{338}"),
            ("&fjlig;", "fj"),
            (
                "&abcdefghijklmnopqrstuvwxyzabcdefgh;",
                "&abcdefghijklmnopqrstuvwxyzabcdefgh;",
            ),
            ("&ltx&gt", "<x>"),
            ("&é;", "&é;"),
            ("&lté", "<é"),
            ("&AMP;&AMP", "&&"),
            (
                "&ampersandxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx;",
                "&ersandxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx;",
            ),
            ("&lt\r;", "<\r;"),
            ("&lt\u{b}&gt", "<\u{b}>"),
        ] {
            assert_eq!(unescape(input), expected, "input {input:?}");
        }
    }
}
