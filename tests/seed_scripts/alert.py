# The seed's "alertas" client script, as the seed document gives it. The document lost the
# closing `")` of the TPM warning line; that is restored and nothing else is changed.
import requests

response = requests.get('http://localhost:5000/stats')
stats = response.json()

# Verificar uso de rate limits
uso_tpm = float(stats['rate_limits']['uso_tpm'].replace('%', ''))
uso_rpd = float(stats['rate_limits']['uso_rpd'].replace('%', ''))

if uso_rpd > 90:
    print("⚠️ ALERTA: Cerca del límite de requests diarios (150 RPD)")
    
if uso_tpm > 80:
    print("⚠️ ALERTA: Alto uso de tokens por minuto (150K TPM)")

costo = float(stats['costo_estimado_usd'].replace('$', ''))
print(f"Costo acumulado: ${costo:.2f} USD")

if costo > 10.0:
    print("⚠️ ALERTA: Costo superó $10 USD")
