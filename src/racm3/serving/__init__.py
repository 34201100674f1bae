"""`racm3 serve`: an HTTP API, a clip-retrieval compatible /knn-service and an offline web page over a model and memory.

app.create_app(model, memory_path, ...) builds the FastAPI app; engine.Engine runs the work (bounded pools, one
Memory per worker thread); limits.py holds the size and queue limits; clip_retrieval.py speaks clip-retrieval's
protocol; page.py is the web page; api_docs.py the offline /docs page.
"""
