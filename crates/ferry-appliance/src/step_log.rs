//! What a step's adapters warn about reaches its migration, not only the appliance's
//! stderr: a `tracing` layer picks up every warning logged inside a `step` span (the
//! engine runs each step in one, with the migration's id) and hands it to the engine,
//! which records it as a `warning` event and a log line of that migration.
//!
//! The layer is installed with the process's subscriber, before any appliance exists;
//! an appliance connects its sink when it starts ([`connect`]). Warnings logged while no
//! sink is connected (or outside a step) only reach the log output.

use std::fmt::Write as _;
use std::sync::{Mutex, OnceLock};

use ferry_model::Step;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use uuid::Uuid;

/// The name of the span the engine runs a step in; its fields `migration` and `step`.
pub const STEP_SPAN: &str = "step";

/// A warning logged while a step of `migration` ran.
#[derive(Debug, Clone, PartialEq)]
pub struct StepWarning {
    pub migration: Uuid,
    pub step: Option<Step>,
    pub message: String,
}

static SINK: OnceLock<Mutex<Option<UnboundedSender<StepWarning>>>> = OnceLock::new();

/// Connects this process's warnings to a receiver (the newest caller wins).
pub fn connect() -> UnboundedReceiver<StepWarning> {
    let (tx, rx) = unbounded_channel();
    if let Ok(mut s) = SINK.get_or_init(|| Mutex::new(None)).lock() {
        *s = Some(tx);
    }
    rx
}

fn send(w: StepWarning) {
    if let Some(Ok(s)) = SINK.get().map(|m| m.lock()) {
        if let Some(tx) = s.as_ref() {
            let _ = tx.send(w);
        }
    }
}

/// The layer to add to the process's subscriber: [`StepWarnings::layer`].
#[derive(Debug, Default)]
pub struct StepWarnings;

impl StepWarnings {
    /// The layer with its own filter: `step` spans (whatever the log level) and
    /// warnings and errors. The log output's filter does not apply to it, so a step's
    /// warnings reach its migration whatever `--log` says.
    pub fn layer<S>() -> impl tracing_subscriber::Layer<S>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        use tracing_subscriber::Layer as _;
        StepWarnings.with_filter(tracing_subscriber::filter::filter_fn(|m| {
            if m.is_span() {
                m.name() == STEP_SPAN
            } else {
                *m.level() <= Level::WARN
            }
        }))
    }
}

/// The migration and step a `step` span was opened for (kept in its extensions).
struct StepOf {
    migration: Uuid,
    step: Option<Step>,
}

#[derive(Default)]
struct SpanFields {
    migration: Option<Uuid>,
    step: Option<Step>,
}

impl Visit for SpanFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record(field, value);
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.record(field, &format!("{value:?}"));
    }
}

impl SpanFields {
    fn record(&mut self, field: &Field, value: &str) {
        match field.name() {
            "migration" => self.migration = value.parse().ok(),
            "step" => self.step = Step::parse(value),
            _ => {}
        }
    }
}

/// An event's message with its other fields after it (`message key=value …`).
#[derive(Default)]
struct Message {
    text: String,
    fields: String,
}

impl Visit for Message {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.text.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.text, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
}

impl<S> tracing_subscriber::Layer<S> for StepWarnings
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().name() != STEP_SPAN {
            return;
        }
        let mut f = SpanFields::default();
        attrs.record(&mut f);
        if let (Some(migration), Some(span)) = (f.migration, ctx.span(id)) {
            span.extensions_mut().insert(StepOf {
                migration,
                step: f.step,
            });
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        if *event.metadata().level() > Level::WARN {
            return;
        }
        let Some(scope) = ctx.event_scope(event) else {
            return;
        };
        for span in scope {
            if let Some(of) = span.extensions().get::<StepOf>() {
                let mut m = Message::default();
                event.record(&mut m);
                send(StepWarning {
                    migration: of.migration,
                    step: of.step,
                    message: format!("{}{}", m.text, m.fields),
                });
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Instrument;
    use tracing_subscriber::layer::SubscriberExt;

    #[tokio::test]
    async fn a_warning_inside_a_step_reaches_the_sink_with_its_fields() {
        let mut rx = connect();
        let sub = tracing_subscriber::registry().with(StepWarnings::layer());
        let _g = tracing::subscriber::set_default(sub);
        let id = Uuid::new_v4();
        async {
            tracing::info!("not a warning");
            tracing::warn!(vm = "web", "VMware Tools are not running");
        }
        .instrument(tracing::info_span!(STEP_SPAN, migration = %id, step = %Step::Preflight))
        .await;
        tracing::warn!("outside any step");
        let w = rx.try_recv().unwrap();
        assert_eq!(w.migration, id);
        assert_eq!(w.step, Some(Step::Preflight));
        assert_eq!(w.message, "VMware Tools are not running vm=web");
        assert!(rx.try_recv().is_err(), "only the step's warning");
    }
}
