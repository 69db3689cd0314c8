//! The clip store: where finished clips and their recipes live. The `clips`
//! folder in `--data` by default, or an S3-compatible bucket (`--store
//! s3://BUCKET/PREFIX`) that a server and workers on other machines share.
//! Both sit behind `object_store`, so the worker and the download code have
//! one path; each object is written whole (a local file under a temporary
//! name renamed into place, an S3 PUT that only exists once complete), and
//! only then is the job marked finished.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{
    ClientOptions, GetResult, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
};

/// Where the clip store is: `--store` and `--s3-endpoint`.
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// `s3://BUCKET[/PREFIX]`; None: the `clips` folder in the data folder.
    pub url: Option<String>,
    /// The endpoint of an S3-compatible service other than AWS (MinIO, R2,
    /// moto), e.g. `http://127.0.0.1:9000`.
    pub endpoint: Option<String>,
}

pub struct Store {
    objects: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    /// This process's scratch folder: the runner's output and the uploaded
    /// still are written here, then the clip and recipe go to the store.
    pub tmp: PathBuf,
    /// The store as the user named it, for messages.
    pub location: String,
    /// The flag that chose the store, for messages.
    flag: &'static str,
}

impl Store {
    /// Opens the store. Nothing is contacted yet: [`Store::check`] does that.
    pub fn open(data: &Path, options: &StoreOptions) -> Result<Store> {
        let tmp = data.join("tmp");
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let Some(url) = &options.url else {
            if options.endpoint.is_some() {
                bail!("--s3-endpoint goes with --store s3://BUCKET/PREFIX");
            }
            let clips = data.join("clips");
            std::fs::create_dir_all(&clips)
                .with_context(|| format!("creating {}", clips.display()))?;
            let folder = LocalFileSystem::new_with_prefix(&clips)
                .with_context(|| format!("opening the clip folder {}", clips.display()))?;
            return Ok(Store {
                objects: Arc::new(folder),
                prefix: ObjectPath::default(),
                tmp,
                location: clips.display().to_string(),
                flag: "--data",
            });
        };
        let (bucket, prefix) = parse_s3_url(url)?;
        // AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION,
        // AWS_ENDPOINT_URL and the other usual AWS_* variables.
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(&bucket);
        let endpoint = options
            .endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
            .filter(|e| !e.is_empty());
        let allow_http = endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"))
            || std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
        if let Some(e) = &endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                bail!("--s3-endpoint {e}: expected an http:// or https:// URL");
            }
            builder = builder.with_endpoint(e);
        }
        // A wrong endpoint or bucket should surface in seconds, not after the
        // default three minutes of retries.
        let builder = builder
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(120)),
            )
            // An http:// endpoint is a local stand-in (MinIO, moto): the user
            // typed http, so plain HTTP is what they asked for.
            .with_allow_http(allow_http)
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(30),
                ..Default::default()
            });
        let s3 = builder
            .build()
            .with_context(|| format!("--store {url}: configuring the S3 client"))?;
        Ok(Store {
            objects: Arc::new(s3),
            prefix,
            tmp,
            location: match &endpoint {
                Some(e) => format!("{url} at {e}"),
                None => url.clone(),
            },
            flag: "--store",
        })
    }

    fn key(&self, name: &str) -> ObjectPath {
        self.prefix.clone().join(name)
    }

    /// Writes and deletes a small object, so that a wrong bucket, endpoint or
    /// credentials stop the process at startup with a message that says so,
    /// rather than failing every job later.
    pub async fn check(&self) -> Result<()> {
        let name = format!(".motif-write-check-{}", crate::random_hex(6));
        let key = self.key(&name);
        let written = self
            .objects
            .put(&key, PutPayload::from_static(b"motif"))
            .await;
        if let Err(e) = written {
            bail!("{}", self.explain(&e, "cannot write to"));
        }
        if let Err(e) = self.objects.delete(&key).await {
            bail!("{}", self.explain(&e, "cannot delete from"));
        }
        Ok(())
    }

    fn explain(&self, e: &object_store::Error, what: &str) -> String {
        let hint = match e {
            object_store::Error::NotFound { .. } => {
                "no such bucket (create it, or fix the name in --store)"
            }
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => {
                "the credentials were refused: check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY \
                 and AWS_REGION, and that they may write to this bucket"
            }
            // Without keys in the environment object_store asks the metadata
            // service of a cloud machine, which elsewhere fails obscurely.
            _ if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() => {
                "no credentials: AWS_ACCESS_KEY_ID is not set (and the cloud metadata \
                 service gave none); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            }
            _ => {
                "check the bucket name in --store, --s3-endpoint (AWS_ENDPOINT_URL), \
                 AWS_REGION and the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
            }
        };
        format!(
            "{} {}: {what} the clip store: {hint}\n  cause: {e}",
            self.flag, self.location
        )
    }

    /// Stores a file written by this process under `name`, whole: a reader
    /// sees either nothing or all of it.
    pub async fn put_file(&self, name: &str, file: &Path) -> Result<()> {
        // Clips are a few megabytes: one request, no multipart upload.
        let bytes = tokio::fs::read(file)
            .await
            .with_context(|| format!("reading {}", file.display()))?;
        self.objects
            .put(&self.key(name), PutPayload::from(bytes))
            .await
            .with_context(|| format!("storing {name} in {}", self.location))?;
        Ok(())
    }

    /// An object for streaming out.
    pub async fn get(&self, name: &str) -> Result<GetResult> {
        self.objects
            .get(&self.key(name))
            .await
            .with_context(|| format!("reading {name} from {}", self.location))
    }

    pub async fn delete(&self, name: &str) -> Result<()> {
        self.objects
            .delete(&self.key(name))
            .await
            .with_context(|| format!("deleting {name} from {}", self.location))
    }
}

/// `s3://BUCKET[/PREFIX]` → bucket and key prefix.
fn parse_s3_url(url: &str) -> Result<(String, ObjectPath)> {
    let Some(rest) = url.strip_prefix("s3://") else {
        bail!("--store {url}: expected s3://BUCKET or s3://BUCKET/PREFIX (without --store, clips go to the data folder)");
    };
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    // S3's bucket naming rules, which also keep the bucket out of the URL path.
    let valid = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !bucket.starts_with(['-', '.'])
        && !bucket.ends_with(['-', '.']);
    if !valid {
        bail!(
            "--store {url}: `{bucket}` is not a bucket name (3 to 63 lowercase letters, digits, `-` or `.`)"
        );
    }
    let prefix = ObjectPath::parse(prefix.trim_end_matches('/'))
        .with_context(|| format!("--store {url}: the prefix `{prefix}`"))?;
    Ok((bucket.to_string(), prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls() {
        let (bucket, prefix) = parse_s3_url("s3://motif-clips/team/a/").unwrap();
        assert_eq!(bucket, "motif-clips");
        assert_eq!(prefix.as_ref(), "team/a");
        let (bucket, prefix) = parse_s3_url("s3://clips").unwrap();
        assert_eq!((bucket.as_str(), prefix.as_ref()), ("clips", ""));
        for bad in [
            "clips",
            "s3://",
            "s3://Big_Bucket/x",
            "gs://clips/x",
            "s3://a/x",
        ] {
            let e = parse_s3_url(bad).unwrap_err().to_string();
            assert!(e.starts_with("--store "), "{bad}: {e}");
        }
    }
}
