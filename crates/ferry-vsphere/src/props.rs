//! Reading a few properties of one managed object.

use crate::soap::{child, esc, this, Client, VIM};
use crate::VsphereError;

impl Client {
    /// `paths` of the object `kind:moref`, as the raw RetrievePropertiesEx answer; read
    /// it with [`prop`].
    pub(crate) async fn properties(
        &self,
        kind: &str,
        moref: &str,
        paths: &[&str],
    ) -> Result<String, VsphereError> {
        let p: String = paths
            .iter()
            .map(|p| format!("<pathSet>{p}</pathSet>"))
            .collect();
        self.call(
            "RetrievePropertiesEx",
            &format!(
                "{}<specSet><propSet><type>{kind}</type>{p}</propSet><objectSet><obj type=\"{kind}\">{}</obj><skip>false</skip></objectSet></specSet><options/>",
                this("PropertyCollector", &self.content.property_collector),
                esc(moref)
            ),
        )
        .await
    }
}

/// The value of property `name` in a RetrievePropertiesEx answer (unset properties are
/// absent).
pub(crate) fn prop<'a, 'i>(
    doc: &'a roxmltree::Document<'i>,
    name: &str,
) -> Option<roxmltree::Node<'a, 'i>> {
    doc.descendants()
        .filter(|n| n.has_tag_name((VIM, "propSet")))
        .find(|p| child(*p, "name").and_then(|n| n.text()) == Some(name))
        .and_then(|p| child(p, "val"))
}

/// The text of property `name`.
pub(crate) fn prop_text(doc: &roxmltree::Document, name: &str) -> Option<String> {
    prop(doc, name).and_then(|v| v.text()).map(str::to_string)
}
