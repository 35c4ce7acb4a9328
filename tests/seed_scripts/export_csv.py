# The seed's "Exportar métricas a CSV" script, unchanged.
import requests
import csv
from datetime import datetime

stats = requests.get('http://localhost:5000/stats').json()

with open('metricas.csv', 'a', newline='') as f:
    writer = csv.writer(f)
    writer.writerow([
        datetime.now(),
        stats['total_requests'],
        stats['tokens']['total'],
        stats['costo_estimado_usd'],
        stats['tasa_exito']
    ])
