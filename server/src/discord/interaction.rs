//! Discord interactions as the endpoint receives them, parsed into what
//! Motif does with them, and the responses it sends back. Field names and
//! type numbers are Discord's (developer documentation, "Interactions").

use serde_json::{json, Map, Value};

/// Interaction types.
const PING: u64 = 1;
const APPLICATION_COMMAND: u64 = 2;
const MESSAGE_COMPONENT: u64 = 3;
const MODAL_SUBMIT: u64 = 5;

/// Who ran the command (a guild member's user, or the user in a DM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscordUser {
    pub id: String,
    pub name: String,
}

/// An attachment given to an ATTACHMENT option, from `data.resolved`.
#[derive(Debug, Clone, PartialEq)]
pub struct Attachment {
    pub id: String,
    pub filename: String,
    pub url: String,
    pub size: u64,
    pub content_type: Option<String>,
}

/// The recipe options a command may carry, each overriding the default (or,
/// for /remix, the remixed clip's recipe) when given.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecipeOptions {
    pub prompt: Option<String>,
    pub negative: Option<String>,
    pub style: Option<String>,
    pub camera: Option<String>,
    pub motion: Option<f64>,
    pub aspect: Option<String>,
    pub seed: Option<u64>,
    pub frames: Option<u64>,
    pub strength: Option<f64>,
}

impl RecipeOptions {
    /// Writes the given options over `recipe` (a job request's JSON object,
    /// the fields of `POST /api/v1/jobs`), leaving the others as they are.
    /// An aspect ratio replaces the recipe's width and height (which would
    /// otherwise win over it).
    pub fn apply(&self, recipe: &mut Map<String, Value>) {
        if self.aspect.is_some() {
            recipe.remove("width");
            recipe.remove("height");
        }
        let mut set = |name: &str, value: Option<Value>| {
            if let Some(v) = value {
                recipe.insert(name.to_string(), v);
            }
        };
        set("prompt", self.prompt.clone().map(Value::from));
        set("negative", self.negative.clone().map(Value::from));
        set("style", self.style.clone().map(Value::from));
        set("camera", self.camera.clone().map(Value::from));
        set("motion", self.motion.map(Value::from));
        set("aspect", self.aspect.clone().map(Value::from));
        set("seed", self.seed.map(Value::from));
        set("frames", self.frames.map(Value::from));
        set("strength", self.strength.map(Value::from));
    }
}

/// What an interaction asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Ping,
    /// `/create prompt:... [options]`
    Create(RecipeOptions),
    /// `/animate image:<attachment> [options]`
    Animate {
        image: Attachment,
        options: RecipeOptions,
    },
    /// `/remix clip:<gallery id or URL> [options]`
    Remix {
        clip: String,
        options: RecipeOptions,
    },
    /// A button on a result message.
    Button {
        custom_id: String,
    },
    /// A submitted modal: its id and its text inputs (custom_id, value).
    Modal {
        custom_id: String,
        fields: Vec<(String, String)>,
    },
}

/// One parsed interaction.
#[derive(Debug, Clone, PartialEq)]
pub struct Interaction {
    pub id: String,
    pub application_id: String,
    /// Valid for 15 minutes: follow-ups and edits of the original response.
    pub token: String,
    pub channel_id: Option<String>,
    pub guild_id: Option<String>,
    /// Absent only for PING.
    pub user: Option<DiscordUser>,
    pub action: Action,
    /// For a button: the text of the message it is on.
    pub message_content: Option<String>,
}

/// Discord's epoch, 2015-01-01T00:00:00Z, in Unix milliseconds.
const DISCORD_EPOCH_MS: i64 = 1_420_070_400_000;

/// When a snowflake id (an interaction's, a message's) was made, in Unix
/// milliseconds: its top 42 bits count milliseconds since Discord's epoch.
pub fn snowflake_ms(id: &str) -> Option<i64> {
    let id: u64 = id.parse().ok()?;
    Some((id >> 22) as i64 + DISCORD_EPOCH_MS)
}

/// Why an interaction could not be understood (answered 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadInteraction(pub String);

fn bad(message: impl Into<String>) -> BadInteraction {
    BadInteraction(message.into())
}

fn text(v: &Value, field: &str) -> Result<String, BadInteraction> {
    match v.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        // Snowflakes are strings in Discord's JSON; accept numbers too.
        Some(Value::Number(n)) => Ok(n.to_string()),
        _ => Err(bad(format!(
            "interaction field `{field}` is missing or not a string"
        ))),
    }
}

/// Parses the raw body of a verified request.
pub fn parse(body: &[u8]) -> Result<Interaction, BadInteraction> {
    let v: Value = serde_json::from_slice(body).map_err(|e| bad(format!("malformed JSON: {e}")))?;
    if !v.is_object() {
        return Err(bad("an interaction is a JSON object"));
    }
    let kind = v
        .get("type")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("interaction field `type` is missing or not a number"))?;
    let id = text(&v, "id")?;
    let application_id = text(&v, "application_id")?;
    let token = if kind == PING {
        v.get("token")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    } else {
        text(&v, "token")?
    };
    let user = v
        .get("member")
        .and_then(|m| m.get("user"))
        .or_else(|| v.get("user"))
        .map(|u| -> Result<DiscordUser, BadInteraction> {
            Ok(DiscordUser {
                id: text(u, "id")?,
                name: u
                    .get("global_name")
                    .and_then(Value::as_str)
                    .or_else(|| u.get("username").and_then(Value::as_str))
                    .unwrap_or("discord user")
                    .to_string(),
            })
        })
        .transpose()?;
    let data = v.get("data").cloned().unwrap_or(Value::Null);
    let action = match kind {
        PING => Action::Ping,
        APPLICATION_COMMAND => command(&data)?,
        MESSAGE_COMPONENT => Action::Button {
            custom_id: text(&data, "custom_id")?,
        },
        MODAL_SUBMIT => Action::Modal {
            custom_id: text(&data, "custom_id")?,
            fields: modal_fields(&data),
        },
        other => return Err(bad(format!("interaction type {other} is not handled"))),
    };
    if action != Action::Ping && user.is_none() {
        return Err(bad("interaction has neither `member.user` nor `user`"));
    }
    Ok(Interaction {
        id,
        application_id,
        token,
        channel_id: v
            .get("channel_id")
            .and_then(Value::as_str)
            .map(String::from),
        guild_id: v.get("guild_id").and_then(Value::as_str).map(String::from),
        user,
        action,
        message_content: v
            .get("message")
            .and_then(|m| m.get("content"))
            .and_then(Value::as_str)
            .map(String::from),
    })
}

fn modal_fields(data: &Value) -> Vec<(String, String)> {
    let rows = data.get("components").and_then(Value::as_array);
    rows.into_iter()
        .flatten()
        .filter_map(|row| row.get("components").and_then(Value::as_array))
        .flatten()
        .filter_map(|c| {
            let id = c.get("custom_id")?.as_str()?;
            let value = c.get("value")?.as_str()?;
            Some((id.to_string(), value.to_string()))
        })
        .collect()
}

fn command(data: &Value) -> Result<Action, BadInteraction> {
    let name = text(data, "name")?;
    let options = data
        .get("options")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let get = |field: &str| {
        options
            .iter()
            .find(|o| o.get("name").and_then(Value::as_str) == Some(field))
    };
    let string = |field: &str| -> Result<Option<String>, BadInteraction> {
        match get(field).map(|o| o.get("value")) {
            None => Ok(None),
            Some(Some(Value::String(s))) => Ok(Some(s.clone())),
            Some(_) => Err(bad(format!("option `{field}` of /{name} must be text"))),
        }
    };
    let number = |field: &str| -> Result<Option<f64>, BadInteraction> {
        match get(field).map(|o| o.get("value")) {
            None => Ok(None),
            Some(Some(Value::Number(n))) => Ok(n.as_f64()),
            Some(_) => Err(bad(format!("option `{field}` of /{name} must be a number"))),
        }
    };
    let whole = |field: &str| -> Result<Option<u64>, BadInteraction> {
        match get(field).map(|o| o.get("value")) {
            None => Ok(None),
            Some(Some(Value::Number(n))) if n.as_u64().is_some() => Ok(n.as_u64()),
            Some(_) => Err(bad(format!(
                "option `{field}` of /{name} must be a whole number >= 0"
            ))),
        }
    };
    let options = RecipeOptions {
        prompt: string("prompt")?,
        negative: string("negative")?,
        style: string("style")?,
        camera: string("camera")?,
        motion: number("motion")?,
        aspect: string("aspect")?,
        seed: whole("seed")?,
        frames: whole("frames")?,
        strength: number("strength")?,
    };
    match name.as_str() {
        "create" => {
            if options
                .prompt
                .as_deref()
                .is_none_or(|p| p.trim().is_empty())
            {
                return Err(bad("/create needs a prompt"));
            }
            Ok(Action::Create(options))
        }
        "animate" => {
            let id = string("image")?.ok_or_else(|| bad("/animate needs an image attachment"))?;
            let a = data
                .get("resolved")
                .and_then(|r| r.get("attachments"))
                .and_then(|a| a.get(&id))
                .ok_or_else(|| bad(format!("attachment {id} is not in `data.resolved`")))?;
            let image = Attachment {
                id: id.clone(),
                filename: a
                    .get("filename")
                    .and_then(Value::as_str)
                    .unwrap_or("image")
                    .to_string(),
                url: text(a, "url")?,
                size: a.get("size").and_then(Value::as_u64).unwrap_or(0),
                content_type: a
                    .get("content_type")
                    .and_then(Value::as_str)
                    .map(String::from),
            };
            Ok(Action::Animate { image, options })
        }
        "remix" => {
            let clip = string("clip")?.ok_or_else(|| bad("/remix needs a clip"))?;
            Ok(Action::Remix { clip, options })
        }
        other => Err(bad(format!("unknown command /{other}"))),
    }
}

/// PONG: the answer to PING.
pub fn pong() -> Value {
    json!({ "type": 1 })
}

/// DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE: "Motif is thinking…", edited
/// later through the webhook with the result.
pub fn deferred() -> Value {
    json!({ "type": 5 })
}

/// A message only the user who ran the command sees (rate limits, errors).
/// It mentions nobody, whatever its text says.
pub fn ephemeral(content: &str) -> Value {
    json!({ "type": 4, "data": {
        "content": content, "flags": 64, "allowed_mentions": { "parse": [] }
    } })
}

/// UPDATE_MESSAGE: the answer to a button that changes the message it is on.
pub fn update_message(data: Value) -> Value {
    json!({ "type": 7, "data": data })
}

/// MODAL: a form with one text input per (custom_id, label, value, max length).
pub fn modal(custom_id: &str, title: &str, inputs: &[(&str, &str, &str, usize)]) -> Value {
    let rows: Vec<Value> = inputs
        .iter()
        .map(|(id, label, value, max)| {
            json!({ "type": 1, "components": [{
                "type": 4, "custom_id": id, "label": label, "style": 2,
                "min_length": 1, "max_length": max, "required": true, "value": value
            }] })
        })
        .collect();
    json!({ "type": 9, "data": { "custom_id": custom_id, "title": title, "components": rows } })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command_body(name: &str, options: Value, resolved: Value) -> Vec<u8> {
        json!({
            "type": 2, "id": "1", "application_id": "99", "token": "tok",
            "channel_id": "55", "guild_id": "66",
            "member": { "user": { "id": "42", "username": "ada", "global_name": "Ada" } },
            "data": { "id": "7", "name": name, "type": 1, "options": options, "resolved": resolved }
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn snowflakes_tell_their_time() {
        // The example of Discord's documentation: 175928847299117063 was made
        // at 2016-04-30 11:18:25.796 UTC.
        assert_eq!(snowflake_ms("175928847299117063"), Some(1_462_015_105_796));
        assert_eq!(snowflake_ms("not a number"), None);
    }

    #[test]
    fn ping_parses_without_a_user() {
        let i = parse(br#"{"type":1,"id":"1","application_id":"99"}"#).unwrap();
        assert_eq!(i.action, Action::Ping);
        assert_eq!(pong(), json!({"type": 1}));
    }

    #[test]
    fn create_carries_every_option_into_the_recipe() {
        let body = command_body(
            "create",
            json!([
                {"name": "prompt", "type": 3, "value": "a red fox"},
                {"name": "style", "type": 3, "value": "anime"},
                {"name": "camera", "type": 3, "value": "zoom-in"},
                {"name": "motion", "type": 10, "value": 2.5},
                {"name": "aspect", "type": 3, "value": "9:16"},
                {"name": "seed", "type": 4, "value": 1234},
                {"name": "frames", "type": 4, "value": 16}
            ]),
            Value::Null,
        );
        let i = parse(&body).unwrap();
        assert_eq!(
            i.user,
            Some(DiscordUser {
                id: "42".into(),
                name: "Ada".into()
            })
        );
        assert_eq!(i.channel_id.as_deref(), Some("55"));
        let Action::Create(o) = &i.action else {
            panic!("{:?}", i.action)
        };
        let mut recipe = Map::new();
        recipe.insert("steps".into(), json!(8));
        recipe.insert("width".into(), json!(64));
        recipe.insert("height".into(), json!(64));
        o.apply(&mut recipe);
        assert_eq!(
            Value::Object(recipe),
            json!({"steps": 8, "prompt": "a red fox", "style": "anime", "camera": "zoom-in",
                   "motion": 2.5, "aspect": "9:16", "seed": 1234, "frames": 16})
        );
    }

    #[test]
    fn animate_resolves_its_attachment_and_remix_overrides_only_what_is_given() {
        let body = command_body(
            "animate",
            json!([{"name": "image", "type": 11, "value": "900"}, {"name": "strength", "type": 10, "value": 0.6}]),
            json!({"attachments": {"900": {"id": "900", "filename": "cat.png", "size": 2048,
                   "url": "https://cdn.discordapp.com/attachments/1/900/cat.png", "content_type": "image/png"}}}),
        );
        let Action::Animate { image, options } = parse(&body).unwrap().action else {
            panic!()
        };
        assert_eq!(
            image.url,
            "https://cdn.discordapp.com/attachments/1/900/cat.png"
        );
        assert_eq!(
            (image.size, image.content_type.as_deref()),
            (2048, Some("image/png"))
        );
        assert_eq!(options.strength, Some(0.6));

        let body = command_body(
            "remix",
            json!([{"name": "clip", "type": 3, "value": "abc"}, {"name": "seed", "type": 4, "value": 9}]),
            Value::Null,
        );
        let Action::Remix { clip, options } = parse(&body).unwrap().action else {
            panic!()
        };
        assert_eq!(clip, "abc");
        let mut recipe = Map::new();
        recipe.insert("prompt".into(), json!("kept"));
        recipe.insert("seed".into(), json!(1));
        options.apply(&mut recipe);
        assert_eq!(Value::Object(recipe), json!({"prompt": "kept", "seed": 9}));
    }

    #[test]
    fn malformed_interactions_name_what_is_wrong() {
        let e = |body: &[u8]| parse(body).unwrap_err().0;
        assert!(e(b"{not json").contains("malformed JSON"));
        assert!(e(b"[1]").contains("JSON object"));
        assert!(e(br#"{"id":"1","application_id":"9"}"#).contains("`type`"));
        assert!(e(br#"{"type":9,"id":"1","application_id":"9","token":"t"}"#).contains("type 9"));
        assert!(e(&command_body("create", json!([]), Value::Null)).contains("needs a prompt"));
        assert!(e(&command_body(
            "create",
            json!([{"name":"prompt","value":"x"},{"name":"seed","value":-1}]),
            Value::Null
        ))
        .contains("`seed`"));
        assert!(e(&command_body(
            "create",
            json!([{"name":"prompt","value":7}]),
            Value::Null
        ))
        .contains("`prompt`"));
        assert!(e(&command_body(
            "animate",
            json!([{"name":"image","value":"1"}]),
            json!({})
        ))
        .contains("attachment 1"));
        assert!(
            e(&command_body("dance", json!([]), Value::Null)).contains("unknown command /dance")
        );
        // A command without a user is refused.
        let no_user = json!({"type":2,"id":"1","application_id":"9","token":"t",
                             "data":{"name":"create","options":[{"name":"prompt","value":"x"}]}});
        assert!(e(no_user.to_string().as_bytes()).contains("member.user"));
    }

    #[test]
    fn buttons_and_modals_parse() {
        let body = json!({"type":3,"id":"1","application_id":"9","token":"t","user":{"id":"5","username":"bo"},
                          "data":{"custom_id":"reroll:abc","component_type":2}});
        assert_eq!(
            parse(body.to_string().as_bytes()).unwrap().action,
            Action::Button {
                custom_id: "reroll:abc".into()
            }
        );
        let body = json!({"type":5,"id":"1","application_id":"9","token":"t","user":{"id":"5","username":"bo"},
                          "data":{"custom_id":"remix:abc","components":[{"type":1,"components":[{"type":4,"custom_id":"prompt","value":"a new prompt"}]}]}});
        assert_eq!(
            parse(body.to_string().as_bytes()).unwrap().action,
            Action::Modal {
                custom_id: "remix:abc".into(),
                fields: vec![("prompt".into(), "a new prompt".into())]
            }
        );
    }
}
