//! Workflow definitions: workflows, their tags and immutable versions, templates and transformation rules.

use crate::index;
use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Workflows {
    Table,
    Id,
    Name,
    Description,
    Status,
    CurrentVersion,
    Triggers,
    Revision,
    RequestId,
    CreateTime,
    UpdateTime,
}

#[derive(DeriveIden)]
enum WorkflowTags {
    Table,
    WorkflowId,
    Tag,
}

#[derive(DeriveIden)]
enum WorkflowVersions {
    Table,
    WorkflowId,
    Version,
    Definition,
    CreateTime,
}

#[derive(DeriveIden)]
enum WorkflowTemplates {
    Table,
    Id,
    Name,
    Description,
    Parameters,
    Workflow,
    RequestId,
    CreateTime,
}

#[derive(DeriveIden)]
enum WorkflowTemplateTags {
    Table,
    TemplateId,
    Tag,
}

#[derive(DeriveIden)]
enum TransformationRules {
    Table,
    Id,
    Name,
    Description,
    Assignments,
    Revision,
    RequestId,
    CreateTime,
    UpdateTime,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Workflows::Table)
                    .col(string(Workflows::Id).primary_key())
                    .col(string_uniq(Workflows::Name))
                    .col(text(Workflows::Description))
                    .col(string(Workflows::Status))
                    .col(big_integer(Workflows::CurrentVersion))
                    .col(json_binary(Workflows::Triggers))
                    .col(big_integer(Workflows::Revision))
                    .col(string_null(Workflows::RequestId).unique_key())
                    .col(timestamp_with_time_zone(Workflows::CreateTime))
                    .col(timestamp_with_time_zone(Workflows::UpdateTime))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "idx_workflows_status",
                Workflows::Table,
                [Workflows::Status],
            ))
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(WorkflowTags::Table)
                    .col(string(WorkflowTags::WorkflowId))
                    .col(string(WorkflowTags::Tag))
                    .primary_key(
                        Index::create()
                            .col(WorkflowTags::WorkflowId)
                            .col(WorkflowTags::Tag),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_workflow_tags_workflow")
                            .from(WorkflowTags::Table, WorkflowTags::WorkflowId)
                            .to(Workflows::Table, Workflows::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "idx_workflow_tags_tag",
                WorkflowTags::Table,
                [WorkflowTags::Tag],
            ))
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(WorkflowVersions::Table)
                    .col(string(WorkflowVersions::WorkflowId))
                    .col(big_integer(WorkflowVersions::Version))
                    .col(json_binary(WorkflowVersions::Definition))
                    .col(timestamp_with_time_zone(WorkflowVersions::CreateTime))
                    .primary_key(
                        Index::create()
                            .col(WorkflowVersions::WorkflowId)
                            .col(WorkflowVersions::Version),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_workflow_versions_workflow")
                            .from(WorkflowVersions::Table, WorkflowVersions::WorkflowId)
                            .to(Workflows::Table, Workflows::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(WorkflowTemplates::Table)
                    .col(string(WorkflowTemplates::Id).primary_key())
                    .col(string_uniq(WorkflowTemplates::Name))
                    .col(text(WorkflowTemplates::Description))
                    .col(json_binary(WorkflowTemplates::Parameters))
                    .col(json_binary(WorkflowTemplates::Workflow))
                    .col(string_null(WorkflowTemplates::RequestId).unique_key())
                    .col(timestamp_with_time_zone(WorkflowTemplates::CreateTime))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(WorkflowTemplateTags::Table)
                    .col(string(WorkflowTemplateTags::TemplateId))
                    .col(string(WorkflowTemplateTags::Tag))
                    .primary_key(
                        Index::create()
                            .col(WorkflowTemplateTags::TemplateId)
                            .col(WorkflowTemplateTags::Tag),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_workflow_template_tags_template")
                            .from(
                                WorkflowTemplateTags::Table,
                                WorkflowTemplateTags::TemplateId,
                            )
                            .to(WorkflowTemplates::Table, WorkflowTemplates::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "idx_workflow_template_tags_tag",
                WorkflowTemplateTags::Table,
                [WorkflowTemplateTags::Tag],
            ))
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(TransformationRules::Table)
                    .col(string(TransformationRules::Id).primary_key())
                    .col(string_uniq(TransformationRules::Name))
                    .col(text(TransformationRules::Description))
                    .col(json_binary(TransformationRules::Assignments))
                    .col(big_integer(TransformationRules::Revision))
                    .col(string_null(TransformationRules::RequestId).unique_key())
                    .col(timestamp_with_time_zone(TransformationRules::CreateTime))
                    .col(timestamp_with_time_zone(TransformationRules::UpdateTime))
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(TransformationRules::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(WorkflowTemplateTags::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(WorkflowTemplates::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(WorkflowVersions::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(WorkflowTags::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Workflows::Table).to_owned())
            .await?;
        Ok(())
    }
}
