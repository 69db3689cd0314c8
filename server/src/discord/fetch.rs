//! The still of `/animate`: fetched only from Discord's attachment host (a
//! configured origin, never any URL an interaction names), within a size
//! limit, without following redirects, and checked to be an image.

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use futures_util::StreamExt;

use super::interaction::Attachment;

/// `scheme://host[:port]` of a URL, for comparing origins.
fn origin_of(url: &reqwest::Url) -> Option<String> {
    let host = url.host_str()?;
    Some(match url.port() {
        Some(port) => format!("{}://{host}:{port}", url.scheme()),
        None => format!("{}://{host}", url.scheme()),
    })
}

/// A configured origin, checked and in the form [`origin_of`] gives.
pub fn parse_origin(text: &str) -> Result<String> {
    let url = reqwest::Url::parse(text)
        .with_context(|| format!("attachment host {text:?}: expected https://HOST[:PORT]"))?;
    if !matches!(url.scheme(), "http" | "https") || url.path().len() > 1 || url.query().is_some() {
        bail!("attachment host {text:?}: expected https://HOST[:PORT] and nothing after it");
    }
    origin_of(&url).with_context(|| format!("attachment host {text:?} has no host"))
}

/// Why a still was refused, in words for the person who ran `/animate`.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("the image must come from Discord's attachment host, not {0}")]
    Host(String),
    #[error("{name} is {size} bytes: at most {limit} bytes")]
    TooLarge {
        name: String,
        size: u64,
        limit: usize,
    },
    #[error("{name} is not an image (PNG, JPEG or WebP)")]
    NotImage { name: String },
    #[error("could not download {name}: {message}")]
    Download { name: String, message: String },
}

/// Downloads the attachment and returns it base64-encoded, as a job's `image`;
/// `origins` in the form [`parse_origin`] gives.
pub async fn still(
    client: &reqwest::Client,
    attachment: &Attachment,
    origins: &[String],
    limit: usize,
) -> Result<String, Refused> {
    let name = attachment.filename.clone();
    let url = reqwest::Url::parse(&attachment.url)
        .map_err(|_| Refused::Host(format!("an unreadable URL ({})", attachment.url)))?;
    let origin = origin_of(&url).unwrap_or_else(|| attachment.url.clone());
    if !origins.contains(&origin) {
        return Err(Refused::Host(origin));
    }
    let too_large = |size: u64| Refused::TooLarge {
        name: name.clone(),
        size,
        limit,
    };
    if attachment.size > limit as u64 {
        return Err(too_large(attachment.size));
    }
    if let Some(kind) = &attachment.content_type {
        if !kind.starts_with("image/") {
            return Err(Refused::NotImage { name });
        }
    }
    let failed = |message: String| Refused::Download {
        name: name.clone(),
        message,
    };
    let response = client
        .get(url)
        .send()
        .await
        .map_err(|e| failed(e.without_url().to_string()))?;
    if !response.status().is_success() {
        return Err(failed(format!("the host answered {}", response.status())));
    }
    if let Some(length) = response.content_length() {
        if length > limit as u64 {
            return Err(too_large(length));
        }
    }
    let mut bytes = Vec::new();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| failed(e.without_url().to_string()))?;
        if bytes.len() + chunk.len() > limit {
            return Err(too_large((bytes.len() + chunk.len()) as u64));
        }
        bytes.extend_from_slice(&chunk);
    }
    let readable = image::ImageReader::new(std::io::Cursor::new(&bytes))
        .with_guessed_format()
        .ok()
        .filter(|r| {
            matches!(
                r.format(),
                Some(image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP)
            )
        })
        .and_then(|r| r.into_dimensions().ok())
        .is_some_and(|(w, h)| w > 0 && h > 0);
    if !readable {
        return Err(Refused::NotImage { name });
    }
    Ok(base64::engine::general_purpose::STANDARD.encode(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_compare_scheme_host_and_port() {
        assert_eq!(
            parse_origin("https://cdn.discordapp.com").unwrap(),
            "https://cdn.discordapp.com"
        );
        assert_eq!(
            parse_origin("http://127.0.0.1:8080/").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert!(parse_origin("cdn.discordapp.com").is_err());
        assert!(parse_origin("https://cdn.discordapp.com/attachments").is_err());
        assert!(parse_origin("ftp://cdn.discordapp.com").is_err());
        let url = |s: &str| origin_of(&reqwest::Url::parse(s).unwrap()).unwrap();
        assert_eq!(
            url("https://cdn.discordapp.com/attachments/1/2/cat.png?ex=1"),
            "https://cdn.discordapp.com"
        );
        // A look-alike host or another port is another origin.
        assert_ne!(
            url("https://cdn.discordapp.com.evil.example/cat.png"),
            "https://cdn.discordapp.com"
        );
        assert_ne!(
            url("https://cdn.discordapp.com:8443/cat.png"),
            "https://cdn.discordapp.com"
        );
        assert_ne!(
            url("http://cdn.discordapp.com/cat.png"),
            "https://cdn.discordapp.com"
        );
    }
}
