//! sea-orm entities of the tables this crate owns (created by `meshflow-migrations`).

/// `workflows`: one row per workflow; the definition lives in `workflow_versions`.
pub mod workflow {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "workflows")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub name: String,
        pub description: String,
        pub status: String,
        pub current_version: i64,
        #[sea_orm(column_type = "JsonBinary")]
        pub triggers: Json,
        pub revision: i64,
        pub request_id: Option<String>,
        pub create_time: DateTimeUtc,
        pub update_time: DateTimeUtc,
        /// When the workflow was deleted; its row stays so that its history stays readable.
        pub delete_time: Option<DateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `workflow_tags`: (workflow, tag) pairs, indexed by tag for filtering.
pub mod workflow_tag {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "workflow_tags")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub workflow_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub tag: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `workflow_versions`: immutable definitions, one per version.
pub mod version {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "workflow_versions")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub workflow_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub version: i64,
        #[sea_orm(column_type = "JsonBinary")]
        pub definition: Json,
        pub create_time: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `workflow_templates`.
pub mod template {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "workflow_templates")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub name: String,
        pub description: String,
        #[sea_orm(column_type = "JsonBinary")]
        pub parameters: Json,
        #[sea_orm(column_type = "JsonBinary")]
        pub workflow: Json,
        pub request_id: Option<String>,
        pub create_time: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `workflow_template_tags`.
pub mod template_tag {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "workflow_template_tags")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub template_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub tag: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `transformation_rules`.
pub mod rule {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "transformation_rules")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub name: String,
        pub description: String,
        #[sea_orm(column_type = "JsonBinary")]
        pub assignments: Json,
        pub revision: i64,
        pub request_id: Option<String>,
        pub create_time: DateTimeUtc,
        pub update_time: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
