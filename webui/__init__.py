"""Streamlit pages: web_ui.py (chat) and web_feadback.py (evaluation, human feedback); common.py: what both share."""
