"""Evaluate ChatGLM and collect human feedback as training data.

    streamlit run webui/web_feadback.py --server.port 6006
    streamlit run webui/web_feadback.py -- --model_name_or_path /models/chatglm-6b --lora_path output \
        --data_dir data/feedback

Evaluate: an instruction and an input -> the answer and the time it took; rate it, correct it, save it. Data: list,
filter, edit, delete and export what was collected (glm_tune/feedback_store.py describes the files).
"""

import json
import shlex
from dataclasses import dataclass

import streamlit as st

from glm_tune.errors import UserError
from glm_tune.feedback_store import FeedbackStore, to_jsonl, training_prompt
from webui.common import EMBEDDED, page_config, sidebar_model, sidebar_settings, stream_answer

RATING = {1: "good", 0: "bad", None: None}  # st.feedback("thumbs"): 1 is thumbs up


@dataclass(frozen=True)
class TableView:
    label: str
    columns: list  # shown in the listing
    editable: list  # fields the edit form changes (none: a log, read only)
    exported: list  # fields of an exported row


TABLES = {
    "dataset": TableView("Training rows (dataset.jsonl)",
                         ["id", "rating", "corrected", "instruction", "input", "output", "time"],
                         ["instruction", "input", "output"], ["instruction", "input", "output"]),
    "preferences": TableView("Preference pairs (preferences.jsonl)",
                             ["id", "instruction", "input", "chosen", "rejected", "time"],
                             ["instruction", "input", "chosen", "rejected"],
                             ["prompt", "chosen", "rejected", "instruction", "input"]),
    "generations": TableView("Generation log (generations.jsonl)",
                             ["time", "seconds", "settings", "instruction", "input", "output", "model", "adapter"], [],
                             ["id", "time", "seconds", "settings", "instruction", "input", "output", "model",
                              "adapter"]),
}


def evaluate_page(config, store):
    model_choice = sidebar_model(config)
    settings = sidebar_settings(config)
    instruction = st.text_area("Instruction", key="instruction")
    input_text = st.text_area("Input (optional)", key="input")
    generate = st.button("Generate", type="primary", key="generate")
    answer_box, time_box = st.empty(), st.empty()
    if generate:
        try:
            if not instruction.strip():
                raise UserError("write an instruction first")
            prompt = training_prompt(instruction, input_text)
            answer, seconds = stream_answer(model_choice, prompt, [], settings, config, answer_box)
        except UserError as err:
            st.error(f"error: {err}")
            return
        st.session_state.generation = store.log_generation(
            instruction, input_text, answer, seconds, settings.as_dict(), model_choice[0] or EMBEDDED, model_choice[1])
    generation = st.session_state.get("generation")
    if generation is None:
        return
    answer_box.markdown(generation["output"] or "*(empty answer)*")
    time_box.caption(f"generated in {generation['seconds']:.2f} s")
    feedback_form(store, generation)


def feedback_form(store, generation):
    st.subheader("Feedback")
    gen_id = generation["id"]
    rating = st.feedback("thumbs", key=f"rating-{gen_id}")
    answer = st.text_area("Correct answer: edit the model's answer if it is wrong", generation["output"],
                          key=f"answer-{gen_id}", height=150)
    saved = st.session_state.setdefault("saved", {})  # generation id -> row id
    if st.button("Save feedback", key="save", disabled=gen_id in saved) and gen_id not in saved:
        try:
            row, pair = store.save_feedback(generation, answer, RATING[rating])
        except UserError as err:
            st.error(f"error: {err}")
            return
        saved[gen_id] = row["id"]
        flash(f"saved row {row['id']} to {store.dataset.path}"
              + (f"; the (corrected, model) answer pair to {store.preferences.path.name}" if pair else ""))
    show_flash()


def flash(message):
    """Rerun the page (so that it shows the new state) with `message` on top of it."""
    st.session_state.flash = message
    st.rerun()


def show_flash():
    if message := st.session_state.pop("flash", None):
        st.success(message)


def data_page(store, config):
    show_flash()
    name = st.selectbox("Table", list(TABLES), format_func=lambda t: TABLES[t].label, key="table")
    view, table = TABLES[name], getattr(store, name)
    rows = table.rows()
    if table.bad_lines:
        st.warning(f"{table.path}: {table.bad_lines} line(s) are not JSON objects; they are kept as they are")
    query = st.text_input("Filter: text in any field", key="filter").strip().lower()
    rating = st.selectbox("Rating", ["any", "good", "bad", "unrated"], key="rating_filter") if view.editable else "any"
    shown = [row for row in rows if _matches(row, query, rating)]
    st.caption(f"{len(shown)} of {len(rows)} rows in {table.path}")
    st.dataframe([{column: _cell(row.get(column)) for column in view.columns} for row in shown], hide_index=True)
    st.download_button(f"Export {len(shown)} row{'' if len(shown) == 1 else 's'} (JSONL)",
                       to_jsonl(shown, view.exported), file_name=table.path.name, mime="application/jsonl",
                       key="export", disabled=not shown)
    if name == "preferences" and rows:
        st.caption("Train an adapter on every pair of this file with DPO (from the repository folder):")
        st.code(dpo_command(config, table.path), language="bash")
    if view.editable and shown:
        edit_row(store, table, {row["id"]: row for row in shown}, view.editable)


def dpo_command(config, path):
    """The dpo.py command that trains on preference file `path`, with this server's model and its first adapter (the
    SFT adapter to start from)."""
    command = ["python", "dpo.py", "--dataset", str(path)]
    if config.models[0]:
        command += ["--model_name_or_path", config.models[0]] + (["--revision", config.revision] if config.revision
                                                                 else [])
    if config.default_adapter:
        command += ["--lora_path", config.default_adapter]
    return shlex.join(command)


def edit_row(store, table, rows, editable):
    st.subheader("Edit or delete a row")
    row_id = st.selectbox("Row", list(rows), key="row",
                          format_func=lambda i: f"{i}: {str(rows[i].get('instruction'))[:60]}")
    with st.form(f"edit-{row_id}"):
        changes = {field: st.text_area(field, rows[row_id].get(field) or "", key=f"edit-{row_id}-{field}")
                   for field in editable}
        submitted = st.form_submit_button("Save changes")
    deleted = st.button("Delete row", key="delete")
    try:
        if submitted:
            store.edit(table, row_id, changes)
            flash(f"row {row_id} saved")
        elif deleted:
            table.delete(row_id)
            flash(f"row {row_id} deleted")
    except UserError as err:
        st.error(f"error: {err}")


def _matches(row, query, rating):
    if rating != "any" and row.get("rating") != (None if rating == "unrated" else rating):
        return False
    return not query or any(query in str(value).lower() for value in row.values())


def _cell(value):
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else value


config = page_config("ChatGLM feedback", "web_feadback.py", with_data_dir=True)
store = FeedbackStore(config.data_dir)
page = st.sidebar.radio("Page", ["Evaluate", "Data"], key="page", horizontal=True)
st.title("ChatGLM evaluation" if page == "Evaluate" else "Collected feedback")
if page == "Evaluate":
    evaluate_page(config, store)
else:
    data_page(store, config)
