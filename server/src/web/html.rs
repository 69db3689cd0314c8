//! HTML building blocks: escaping, the page frame, form pieces. Pages are
//! plain strings built here; every piece of user text goes through [`esc`].

use std::fmt::Write as _;

use crate::accounts::User;

/// Escapes text for HTML element content and quoted attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a query parameter value.
pub fn url_param(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Who is looking at a page: nav links and the CSRF token of its forms.
pub struct Frame<'a> {
    pub user: Option<&'a User>,
    pub csrf: &'a str,
}

/// The hidden CSRF field every form carries.
pub fn csrf_field(csrf: &str) -> String {
    format!(r#"<input type="hidden" name="csrf" value="{}">"#, esc(csrf))
}

/// A one-button POST form.
pub fn post_button(frame: &Frame, action: &str, label: &str, class: &str) -> String {
    format!(
        r#"<form method="post" action="{}" class="inline">{}<button type="submit" class="{}">{}</button></form>"#,
        esc(action),
        csrf_field(frame.csrf),
        esc(class),
        esc(label)
    )
}

/// The whole page around `body`.
pub fn page(frame: &Frame, title: &str, body: &str) -> String {
    let mut nav = String::from(r#"<a href="/">Gallery</a><a href="/create">Create</a>"#);
    match frame.user {
        Some(user) => {
            nav.push_str(r#"<a href="/me">My clips</a>"#);
            if user.admin {
                nav.push_str(r#"<a href="/admin/reports">Reports</a>"#);
            }
            let _ = write!(
                nav,
                r#"<span class="who">{}</span><form method="post" action="/logout" class="inline">{}<button type="submit" class="link">Log out</button></form>"#,
                esc(&user.name),
                csrf_field(frame.csrf)
            );
        }
        None => nav.push_str(
            r#"<a href="/login">Log in</a><a href="/signup" class="button small">Sign up</a>"#,
        ),
    }
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="csrf" content="{csrf}">
<title>{title} · Motif</title>
<link rel="stylesheet" href="/assets/style.css">
<script src="/assets/app.js" defer></script>
</head>
<body>
<header class="top"><a class="brand" href="/">motif<span>gallery</span></a><nav>{nav}</nav></header>
<main>
{body}
</main>
<footer>Made with <a href="/api/v1/openapi.json">Motif</a>: local text-to-video on any GPU.</footer>
</body>
</html>
"#,
        csrf = esc(frame.csrf),
        title = esc(title),
    )
}

/// `<option>`s for a select, `selected` marked; the first is "any"/"none".
pub fn options(empty_label: &str, values: &[&str], selected: Option<&str>) -> String {
    let mut out = format!(r#"<option value="">{}</option>"#, esc(empty_label));
    for v in values {
        let mark = if Some(*v) == selected {
            " selected"
        } else {
            ""
        };
        let _ = write!(out, r#"<option value="{0}"{mark}>{0}</option>"#, esc(v));
    }
    out
}

/// "3 minutes ago"-style age of a Unix ms time.
pub fn age(ms: i64, now_ms: i64) -> String {
    let s = ((now_ms - ms) / 1000).max(0);
    match s {
        0..=59 => "just now".to_string(),
        60..=3599 => format!("{} min ago", s / 60),
        3600..=86_399 => format!("{} h ago", s / 3600),
        _ => format!("{} days ago", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc(r#"<script>alert("1")</script> & 'x'"#),
            "&lt;script&gt;alert(&quot;1&quot;)&lt;/script&gt; &amp; &#39;x&#39;"
        );
        assert_eq!(url_param("a b&c/é"), "a%20b%26c%2F%C3%A9");
    }
}
